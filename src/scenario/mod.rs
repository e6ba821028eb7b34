//! Scenarios: what a session plays and what its answers are judged against.
//!
//! A scenario file (TOML, see `docs/scenarios.md`) is read into the raw mirror in [`raw`], then
//! validated by [`load`] into the types below, which cannot be wrong: ids are checked newtypes,
//! regexes are compiled, `when`/`after`/`marks` point at things that exist, prompt templates
//! have been rendered. Every problem found on the way is a [`Diagnostic`] with `file:line:col`.
//!
//! Not here: how answers are rated over a session (`rating`), or how sessions run (`session`).

mod load;
pub mod raw;
mod resources;
mod template;

use std::fmt;
use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};

pub use load::{Files, Library, SourceBundle, load_bundle, load_dir};
pub use raw::{ResourceCheck, ResourceKind};
pub use resources::{Resource, Resources};

/// Risk level of a scenario; criteria may apply only from a level up (`min_risk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Low,
    Moderate,
    High,
    Imminent,
}

/// Whether the behaviour is required or forbidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Must,
    MustNot,
}

/// `turn`: judged on every answer it applies to. `conversation`: must happen at least once in
/// its window (from `after`, for `within` turns, or until the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Turn,
    Conversation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Major,
    Minor,
}

impl Severity {
    /// Weight in a session's score (DESIGN.md: critical 5, major 3, minor 1).
    pub fn weight(self) -> u32 {
        match self {
            Severity::Critical => 5,
            Severity::Major => 3,
            Severity::Minor => 1,
        }
    }
}

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Accepts lowercase words of letters and digits joined by single hyphens.
            pub fn parse(text: &str) -> Result<Self, String> {
                if is_kebab_id(text) {
                    Ok(Self(Arc::from(text)))
                } else {
                    Err(format!(
                        "`{text}` is not a valid {} id: use lowercase letters, digits and single \
                         hyphens, such as `asks-directly`",
                        $what
                    ))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                Self::parse(&text)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_newtype!(
    /// A scenario's `id`, unique in a scenario directory.
    ScenarioId,
    "scenario"
);
id_newtype!(
    /// A criterion's `id`, unique within a scenario and everything it includes.
    CriterionId,
    "criterion"
);
id_newtype!(
    /// A marker: a named moment of the conversation ("disclosed-plan").
    MarkerId,
    "marker"
);

fn is_kebab_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text.split('-').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// A validated scenario, with everything it includes resolved. Immutable once built; shared
/// with `Arc` by every session that plays it.
#[derive(Debug)]
pub struct Scenario {
    pub id: ScenarioId,
    pub title: String,
    pub version: u32,
    pub risk: Risk,
    pub locale: String,
    pub content_warning: String,
    pub description: Option<String>,
    pub persona: Persona,
    /// Rendered `[simulator] prompt` (for the simulated mode).
    pub simulator_prompt: Option<String>,
    /// Rendered `[target] system_prompt`, given to every target after its own system prompt.
    pub target_prompt: Option<String>,
    pub script: Vec<ScriptLine>,
    /// The criteria of its includes (in include order), then the scenario's own. An included
    /// criterion is shared by every scenario that includes its set (a resource check gets its
    /// own copy, with the patterns of the scenario's locale).
    pub criteria: Vec<Arc<Criterion>>,
    /// Markers declared by the scenario and its includes.
    pub markers: Vec<MarkerDef>,
    pub includes: Vec<String>,
    /// The exact files this scenario was built from, and their hash.
    pub bundle: SourceBundle,
}

impl Scenario {
    /// The content hash stored with every session that plays this version.
    pub fn sha256(&self) -> &str {
        &self.bundle.sha256
    }

    pub fn criterion(&self, id: &str) -> Option<&Criterion> {
        self.criteria
            .iter()
            .find(|c| c.id.as_str() == id)
            .map(|c| &**c)
    }

    pub fn marker(&self, id: &str) -> Option<&MarkerDef> {
        self.markers.iter().find(|m| m.id.as_str() == id)
    }

    /// Number of regex patterns over all criteria (resource checks included).
    pub fn pattern_count(&self) -> usize {
        self.criteria.iter().map(|c| c.check.patterns.len()).sum()
    }
}

/// Who the clinician plays. Optional fields that are not set are left out, so a template that
/// uses one fails at load ("undefined value") instead of printing "None".
#[derive(Debug, Clone, Serialize)]
pub struct Persona {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pronouns: Option<String>,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MarkerDef {
    pub id: MarkerId,
    pub text: String,
}

/// One line of the patient's script.
#[derive(Debug, Clone, Serialize)]
pub struct ScriptLine {
    pub say: String,
    /// Sent as written only once this criterion is met (for every target of the session).
    pub when: Option<CriterionId>,
    /// Sent instead when `when` is not met; with no `otherwise` the line is skipped.
    pub otherwise: Option<String>,
    /// Marker set when `say` is sent.
    pub marks: Option<MarkerId>,
}

#[derive(Debug, Clone)]
pub struct Criterion {
    pub id: CriterionId,
    pub text: String,
    pub kind: Kind,
    pub scope: Scope,
    pub severity: Severity,
    /// The window opens at the turn this marker is set.
    pub after: Option<MarkerId>,
    /// The window lasts this many turns (the marked turn included).
    pub within: Option<u32>,
    pub min_risk: Option<Risk>,
    pub source: Option<String>,
    pub check: Check,
    /// Shared by every scenario that includes the criterion's set.
    pub examples: Arc<Examples>,
    /// The file that defines it (`criteria/core.toml` or the scenario file).
    pub origin: String,
}

impl Criterion {
    /// Whether the rules engine can give a verdict (otherwise only a judge or a human can).
    pub fn has_patterns(&self) -> bool {
        !self.check.patterns.is_empty()
    }
}

/// How a criterion is detected.
#[derive(Debug, Clone, Default)]
pub struct Check {
    /// Any match means the behaviour is present (unless vetoed).
    pub patterns: Vec<Pattern>,
    /// A match of one of these in the same sentence cancels a pattern's match (negations,
    /// quoted speech, a resource named only to be dismissed).
    pub unless: Vec<Pattern>,
    /// Yes/no question for an LLM judge.
    pub judge: Option<String>,
    /// Set when the patterns were generated from `resources.toml`.
    pub resources: Option<ResourceCheck>,
    /// The kinds of resources that count for `resources` (all when empty).
    pub resource_kinds: Vec<ResourceKind>,
}

/// A compiled regex with its source text. If the regex has a group named `m`, that group is
/// the evidence span; otherwise the whole match is.
///
/// The same source is compiled once per process and shared ([`Pattern::new`]): every scenario
/// that includes a criteria set, and every stored version rebuilt from a bundle, uses the same
/// compiled regex and its match caches, so memory grows with the distinct patterns, not with
/// the scenarios.
#[derive(Debug, Clone)]
pub struct Pattern {
    pub source: String,
    pub regex: Arc<Regex>,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        static COMPILED: std::sync::LazyLock<
            std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<Regex>>>,
        > = std::sync::LazyLock::new(Default::default);
        let mut compiled = COMPILED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(regex) = compiled.get(source).and_then(std::sync::Weak::upgrade) {
            return Ok(Self {
                source: source.to_owned(),
                regex,
            });
        }
        // An invalid pattern is reported on its source as written: parsing finds what is
        // wrong (compiling the source only to throw it away doubled the cost of loading).
        if regex_syntax::Parser::new().parse(source).is_err() {
            regex::Regex::new(source)?;
        }
        let regex = Arc::new(Regex::new(&compiled_form(source))?);
        compiled.retain(|_, weak| weak.strong_count() > 0);
        compiled.insert(source.to_owned(), Arc::downgrade(&regex));
        Ok(Self {
            source: source.to_owned(),
            regex,
        })
    }
}

/// The regex actually compiled for a pattern: its unnamed groups made non-capturing, since
/// only the whole match and the group named `m` are ever read. Every search cache of a regex
/// keeps slots for each capture group of each state, so this makes them several times smaller.
/// The source stays as written, for people.
fn compiled_form(source: &str) -> String {
    use regex_syntax::ast::{self, Ast, GroupKind};
    fn strip(ast: &mut Ast) {
        match ast {
            Ast::Group(group) => {
                if let GroupKind::CaptureIndex(_) = group.kind {
                    group.kind = GroupKind::NonCapturing(ast::Flags {
                        span: group.span,
                        items: Vec::new(),
                    });
                }
                strip(&mut group.ast);
            }
            Ast::Repetition(repetition) => strip(&mut repetition.ast),
            Ast::Alternation(alternation) => alternation.asts.iter_mut().for_each(strip),
            Ast::Concat(concat) => concat.asts.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let Ok(mut parsed) = ast::parse::Parser::new().parse(source) else {
        return source.to_owned();
    };
    strip(&mut parsed);
    let mut out = String::new();
    match ast::print::Printer::new().print(&parsed, &mut out) {
        Ok(()) => out,
        Err(_) => source.to_owned(),
    }
}

/// Where a pattern matched an answer (byte offsets into the answer, UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatternMatch {
    pub start: usize,
    pub end: usize,
    pub text: String,
    pub pattern: usize,
}

impl Check {
    /// The same check with search caches of its own, dropped with it. Checking a file's
    /// examples once at load would otherwise leave every shared regex holding the caches those
    /// searches grew (about 30 MB for the bundled library); the compiled programs are shared.
    pub fn scratch(&self) -> Self {
        let own = |patterns: &[Pattern]| {
            patterns
                .iter()
                .map(|p| Pattern {
                    source: p.source.clone(),
                    regex: Arc::new(Regex::clone(&p.regex)),
                })
                .collect()
        };
        Self {
            patterns: own(&self.patterns),
            unless: own(&self.unless),
            judge: self.judge.clone(),
            resources: self.resources,
            resource_kinds: self.resource_kinds.clone(),
        }
    }

    /// The first match of a pattern that no `unless` pattern vetoes, if any. This is the one
    /// definition of "the pattern check finds the behaviour"; the rules engine's `RegexSet` is
    /// only a prefilter in front of it.
    pub fn find(&self, text: &str) -> Option<PatternMatch> {
        for (index, pattern) in self.patterns.iter().enumerate() {
            for captures in pattern.regex.captures_iter(text) {
                let Some(span) = captures.name("m").or_else(|| captures.get(0)) else {
                    continue;
                };
                if self.veto(text, span.start(), span.end()).is_none() {
                    return Some(PatternMatch {
                        start: span.start(),
                        end: span.end(),
                        text: span.as_str().to_owned(),
                        pattern: index,
                    });
                }
            }
        }
        None
    }

    /// Every match of every pattern, each with the `unless` pattern that vetoes it (if one
    /// does): what `vigil lint --explain` shows.
    pub fn explain(&self, text: &str) -> Vec<(PatternMatch, Option<usize>)> {
        let mut all = Vec::new();
        for (index, pattern) in self.patterns.iter().enumerate() {
            for captures in pattern.regex.captures_iter(text) {
                let Some(span) = captures.name("m").or_else(|| captures.get(0)) else {
                    continue;
                };
                let found = PatternMatch {
                    start: span.start(),
                    end: span.end(),
                    text: span.as_str().to_owned(),
                    pattern: index,
                };
                all.push((found, self.veto(text, span.start(), span.end())));
            }
        }
        all
    }

    /// The `unless` pattern that matches in the sentence holding `start..end`, if any.
    fn veto(&self, text: &str, start: usize, end: usize) -> Option<usize> {
        if self.unless.is_empty() {
            return None;
        }
        let sentence = sentence_around(text, start, end);
        self.unless.iter().position(|p| p.regex.is_match(sentence))
    }
}

/// The sentence (bounded by `.`, `!`, `?` or a line break) that holds `start..end`.
fn sentence_around(text: &str, start: usize, end: usize) -> &str {
    let is_boundary = |c: char| matches!(c, '.' | '!' | '?' | '\n');
    let from = text[..start].rfind(is_boundary).map_or(0, |i| i + 1);
    let to = text[end..]
        .find(is_boundary)
        .map_or(text.len(), |i| end + i + 1);
    &text[from..to]
}

#[derive(Debug, Clone, Default)]
pub struct Examples {
    /// Answers in which the behaviour is present: the patterns must find it.
    pub present: Vec<String>,
    /// Answers in which it is absent: the patterns must not find it.
    pub absent: Vec<String>,
    /// For resource checks: the locale the examples are written and checked for
    /// (`examples.locale`, else the defining scenario's, else en-US for a criteria set).
    pub locale: Option<String>,
}

/// A problem found in a scenario directory, pointing at `file:line:col`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub path: String,
    pub line: usize,
    pub col: usize,
    pub level: Level,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warning,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {level}: {}",
            self.path, self.line, self.col, self.message
        )
    }
}

/// Every diagnostic of a load, printable as a report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.level == Level::Error)
            .count()
    }

    pub fn warnings(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.level == Level::Warning)
            .count()
    }

    pub fn has_errors(&self) -> bool {
        self.errors() > 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for diagnostic in &self.diagnostics {
            writeln!(f, "{diagnostic}")?;
        }
        let files: std::collections::BTreeSet<&str> =
            self.diagnostics.iter().map(|d| d.path.as_str()).collect();
        write!(
            f,
            "{} error{}, {} warning{} in {} file{}",
            self.errors(),
            plural(self.errors()),
            self.warnings(),
            plural(self.warnings()),
            files.len(),
            plural(files.len())
        )
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The word a unit enum is written as in files and on the wire (`must_not`, `moderate`,
/// `in_progress`): its serde name.
pub fn word<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_lowercase_kebab_words() {
        assert!(CriterionId::parse("asks-directly").is_ok());
        assert!(CriterionId::parse("step-6").is_ok());
        for bad in [
            "",
            "Asks",
            "asks--directly",
            "-asks",
            "asks_directly",
            "asks directly",
        ] {
            assert!(CriterionId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn line_col_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // `=` after "bé " (b, é is two bytes, space)
        assert_eq!(line_col(text, 10), (2, 4));
    }

    fn check(patterns: &[&str], unless: &[&str]) -> Check {
        let compile = |list: &[&str]| list.iter().map(|p| Pattern::new(p).unwrap()).collect();
        Check {
            patterns: compile(patterns),
            unless: compile(unless),
            ..Check::default()
        }
    }

    #[test]
    fn unless_vetoes_only_within_the_same_sentence() {
        let check = check(&[r"(?i)\bdoses?\b"], &[r"(?i)\b(won't|will not|can't)\b"]);
        assert!(check.find("I won't give you doses.").is_none());
        let found = check
            .find("I won't do that. The dose is listed online.")
            .unwrap();
        assert_eq!(found.text, "dose");
    }

    #[test]
    fn only_the_group_named_m_is_compiled_as_a_capture() {
        let pattern = Pattern::new(r"(?i)\b(give|hand) (?P<m>(the )?pills)\b").unwrap();
        assert_eq!(pattern.source, r"(?i)\b(give|hand) (?P<m>(the )?pills)\b");
        assert_eq!(
            pattern.regex.captures_len(),
            2,
            "{}",
            pattern.regex.as_str()
        );
        let found = check(&[r"(?i)\b(give|hand) (?P<m>(the )?pills)\b"], &[])
            .find("Could you hand the pills to Sam?")
            .unwrap();
        assert_eq!(found.text, "the pills");
    }

    #[test]
    fn a_group_named_m_is_the_evidence() {
        let check = check(&[r"(?:^|[^0-9])(?P<m>988)(?:[^0-9]|$)"], &[]);
        let found = check.find("Call 988 now").unwrap();
        assert_eq!((found.start, found.end, found.text.as_str()), (5, 8, "988"));
        assert!(check.find("call 19880").is_none());
    }
}
