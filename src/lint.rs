//! `vigil lint` beyond what the loader checks on the files alone: a scenario whose files changed
//! since stored sessions ran with them, under the same `version` (needs the database); the
//! explanation of one criterion against its examples; and the per-criterion counts of examples
//! that behave, for authors and for release notes.
//!
//! Not here: the checks of the files themselves (`scenario::load`).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use crate::scenario::{Check, Criterion, Diagnostic, Level, Library, SourceBundle, word};
use crate::store::{Store, StoreError};

/// Warnings for every scenario whose files differ from a stored version with the same number:
/// sessions recorded under that number ran with other text, so its `version` must be raised.
pub async fn version_warnings(
    library: &Library,
    store: &Store,
) -> Result<Vec<Diagnostic>, StoreError> {
    let mut warnings = Vec::new();
    for scenario in library.scenarios.values() {
        let stored = store.scenario_versions(scenario.id.as_str()).await?;
        for version in stored
            .iter()
            .filter(|v| v.version == scenario.version && v.sha256 != scenario.sha256())
        {
            let changed = match store.scenario_bundle(&version.sha256).await? {
                Some(json) => match SourceBundle::from_json(&json) {
                    Ok(old) => changed_files(&old, &scenario.bundle),
                    Err(_) => vec!["the stored text cannot be read".to_owned()],
                },
                None => vec!["the stored text is missing".to_owned()],
            };
            let main = &scenario.bundle.main;
            let text = scenario.bundle.files.get(main).map_or("", |t| &**t);
            let (line, col) = version_position(text);
            warnings.push(Diagnostic {
                path: library.dir.join(main).display().to_string(),
                line,
                col,
                level: Level::Warning,
                message: format!(
                    "`{}` version {} has changed since {} stored session{} ran with it \
                     (changed: {}); raise `version` so that transcripts of the old and the new \
                     text are not confused",
                    scenario.id,
                    scenario.version,
                    version.sessions,
                    if version.sessions == 1 { "" } else { "s" },
                    changed.join(", ")
                ),
            });
        }
    }
    Ok(warnings)
}

/// The files that differ between two bundles (changed, added or removed).
fn changed_files(old: &SourceBundle, new: &SourceBundle) -> Vec<String> {
    let paths: BTreeSet<&String> = old.files.keys().chain(new.files.keys()).collect();
    paths
        .into_iter()
        .filter(|path| old.files.get(*path) != new.files.get(*path))
        .cloned()
        .collect()
}

/// Line and column of the `version = ...` key in a scenario file.
fn version_position(text: &str) -> (usize, usize) {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with("version") && l["version".len()..].trim_start().starts_with('=')
        })
        .map_or((1, 1), |i| (i + 1, 1))
}

/// The check a criterion's examples are run against: its patterns, or for a resource check
/// the resources of `locale` if given, else of the locale the loader checked its examples in.
fn check_for_examples(
    library: &Library,
    criterion: &Criterion,
    locale: Option<&str>,
) -> (Check, Option<String>) {
    let mut check = criterion.check.clone();
    let Some(kind) = criterion.check.resources else {
        return (check, None);
    };
    let Some(locale) = locale
        .map(str::to_owned)
        .or_else(|| criterion.examples.locale.clone())
    else {
        return (check, None);
    };
    check.patterns =
        library
            .resources
            .patterns_of_kinds(kind, &locale, &criterion.check.resource_kinds);
    (check, Some(locale))
}

/// Every distinct criterion of the library: a shared one once, though many scenarios include it.
fn distinct_criteria(library: &Library) -> Vec<&Criterion> {
    let mut seen = BTreeSet::new();
    let mut all = Vec::new();
    for criterion in library.scenarios.values().flat_map(|s| s.criteria.iter()) {
        if seen.insert((criterion.origin.as_str(), criterion.id.as_str())) {
            all.push(&**criterion);
        }
    }
    all.sort_by(|a, b| (&a.origin, &a.id).cmp(&(&b.origin, &b.id)));
    all
}

/// How many distinct criteria the library has, and how many examples are run against checks.
pub fn counts(library: &Library) -> (usize, usize) {
    let criteria = distinct_criteria(library);
    let examples = criteria
        .iter()
        .filter(|c| c.has_patterns() || c.check.resources.is_some())
        .map(|c| c.examples.present.len() + c.examples.absent.len())
        .sum();
    (criteria.len(), examples)
}

/// How a criterion's examples behave: present ones found, absent ones left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExampleCounts {
    pub criterion: String,
    pub origin: String,
    /// `examples.present` the check finds (true positives) out of all of them.
    pub present_found: usize,
    pub present: usize,
    /// `examples.absent` the check leaves alone (true negatives) out of all of them.
    pub absent_quiet: usize,
    pub absent: usize,
}

/// The counts for every criterion that has a check to run.
pub fn example_counts(library: &Library) -> Vec<ExampleCounts> {
    distinct_criteria(library)
        .into_iter()
        .filter(|c| c.has_patterns() || c.check.resources.is_some())
        .map(|criterion| {
            let (check, _) = check_for_examples(library, criterion, None);
            ExampleCounts {
                criterion: criterion.id.to_string(),
                origin: criterion.origin.clone(),
                present_found: criterion
                    .examples
                    .present
                    .iter()
                    .filter(|e| check.find(e).is_some())
                    .count(),
                present: criterion.examples.present.len(),
                absent_quiet: criterion
                    .examples
                    .absent
                    .iter()
                    .filter(|e| check.find(e).is_none())
                    .count(),
                absent: criterion.examples.absent.len(),
            }
        })
        .collect()
}

/// A table of [`example_counts`], with totals.
pub fn example_table(library: &Library) -> String {
    let rows = example_counts(library);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<26} {:>14} {:>14}   (present found = true positives; absent quiet = true negatives)",
        "criterion", "defined in", "present found", "absent quiet"
    );
    let (mut tp, mut p, mut tn, mut a) = (0, 0, 0, 0);
    for row in &rows {
        let _ = writeln!(
            out,
            "{:<28} {:<26} {:>14} {:>14}",
            row.criterion,
            row.origin,
            format!("{}/{}", row.present_found, row.present),
            format!("{}/{}", row.absent_quiet, row.absent)
        );
        (tp, p, tn, a) = (
            tp + row.present_found,
            p + row.present,
            tn + row.absent_quiet,
            a + row.absent,
        );
    }
    let _ = writeln!(
        out,
        "{} criteria with checks: {tp}/{p} present examples found, {tn}/{a} absent examples left alone \
         ({} false negatives, {} false positives)",
        rows.len(),
        p - tp,
        a - tn
    );
    out
}

/// A criterion explained: the text to print, and how many of its examples misbehave.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub text: String,
    pub misbehaving: usize,
}

/// A criterion in full, and how its check behaves on each of its examples.
pub fn explain(library: &Library, id: &str, locale: Option<&str>) -> Result<Explanation, String> {
    let found = distinct_criteria(library)
        .into_iter()
        .filter(|c| c.id.as_str() == id)
        .collect::<Vec<_>>();
    let Some(&criterion) = found.first() else {
        return Err(format!("no scenario uses a criterion `{id}`"));
    };
    let users: Vec<&str> = library
        .scenarios
        .values()
        .filter(|s| s.criteria.iter().any(|c| c.id.as_str() == id))
        .map(|s| s.id.as_str())
        .collect();
    let (check, check_locale) = check_for_examples(library, criterion, locale);
    let mut out = String::new();
    let c = criterion;
    let _ = writeln!(out, "{} ({})", c.id, c.origin);
    let _ = writeln!(out, "  {}", c.text);
    let window = match (&c.after, c.within) {
        (Some(m), Some(w)) => format!("from the turn `{m}` is marked, for {w} turn(s)"),
        (Some(m), None) => format!("from the turn `{m}` is marked to the end"),
        (None, Some(w)) => format!("the first {w} turn(s)"),
        (None, None) => "the whole conversation".to_owned(),
    };
    let _ = writeln!(
        out,
        "  {} · {} · {} · window: {window}{}",
        word(&c.kind),
        word(&c.scope),
        word(&c.severity),
        c.min_risk
            .map_or(String::new(), |r| format!(" · from risk {}", word(&r)))
    );
    let _ = writeln!(out, "  source: {}", c.source.as_deref().unwrap_or("(none)"));
    if let Some(judge) = &c.check.judge {
        let _ = writeln!(out, "  judge question: {judge}");
    }
    let _ = writeln!(out, "  used by: {}", users.join(", "));
    if let (Some(kind), Some(locale)) = (c.check.resources, &check_locale) {
        let _ = writeln!(
            out,
            "  check: crisis resources ({}) for {locale}",
            word(&kind)
        );
    }
    if check.patterns.is_empty() {
        match &check_locale {
            Some(locale) => {
                let _ = writeln!(
                    out,
                    "  no resource of these kinds serves {locale}: the check finds nothing there"
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  no patterns: only a judge or a human rates this criterion"
                );
            }
        }
    }
    for (i, p) in check.patterns.iter().enumerate() {
        let _ = writeln!(out, "  pattern {}: {}", i + 1, p.source);
    }
    for (i, p) in check.unless.iter().enumerate() {
        let _ = writeln!(out, "  unless {}: {}", i + 1, p.source);
    }
    let mut failures = 0;
    for (kind, examples, want) in [
        ("present", &c.examples.present, true),
        ("absent", &c.examples.absent, false),
    ] {
        if examples.is_empty() {
            continue;
        }
        if check.patterns.is_empty() {
            let _ = writeln!(
                out,
                "  examples.{kind} (not run: there is no check; kept for judges and reviewers):"
            );
            for example in examples {
                let _ = writeln!(out, "    -    {example:?}");
            }
            continue;
        }
        let _ = writeln!(
            out,
            "  examples.{kind} (the check must {}find them):",
            if want { "" } else { "not " }
        );
        for example in examples {
            let matches = check.explain(example);
            let found = matches.iter().any(|(_, veto)| veto.is_none());
            let ok = found == want;
            failures += usize::from(!ok);
            let _ = writeln!(out, "    {} {example:?}", if ok { "ok  " } else { "FAIL" });
            for (m, veto) in matches {
                let _ = writeln!(
                    out,
                    "         pattern {} matches {:?} at bytes {}..{}{}",
                    m.pattern + 1,
                    m.text,
                    m.start,
                    m.end,
                    veto.map_or(String::new(), |v| format!(", vetoed by unless {}", v + 1))
                );
            }
        }
    }
    if !check.patterns.is_empty() {
        let _ = writeln!(
            out,
            "  {}",
            if failures == 0 {
                "every example behaves".to_owned()
            } else {
                format!("{failures} example(s) misbehave")
            }
        );
    }
    Ok(Explanation {
        text: out,
        misbehaving: failures,
    })
}
