//! The rules rater. A scenario's patterns are searched in two steps: a `RegexSet` prefilter
//! says which criteria's patterns hit, then only those criteria are searched for their evidence
//! span (with their `unless` vetoes), through the same [`Check::find`] that the lint runs on the
//! examples, so the engine and the examples cannot disagree.
//!
//! The prefilter is built per criteria set (each included file, and the scenario's own
//! criteria), for the patterns that apply at the scenario's risk and locale, and shared by
//! every scenario with the same set: 200 scenarios that include the same five sets compile five
//! prefilters, not 200. What is built per scenario version is only the map from a set's
//! criteria to the scenario's.
//!
//! [`Check::find`]: crate::scenario::Check::find

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

use regex::RegexSet;

use super::{CriterionVerdict, Evidence, Verdict};
use crate::scenario::{Kind, Scenario};

/// The compiled prefilter of one criteria set: every pattern of its rated criteria.
#[derive(Debug)]
struct Prefilter {
    /// `None` when the combined set is too large for the regex engine, in which case every
    /// criterion of the set is searched on its own (slower, same verdicts).
    set: Option<RegexSet>,
    /// For each pattern of the set, the position of its criterion in the group.
    owner: Vec<usize>,
}

/// One criteria set of a scenario: its shared prefilter and its criteria (indices into the
/// scenario's criteria, in the prefilter's order).
#[derive(Debug)]
struct Group {
    prefilter: Arc<Prefilter>,
    criteria: Vec<usize>,
}

/// The compiled rules of one scenario version.
#[derive(Debug)]
pub struct RuleSet {
    scenario: Arc<Scenario>,
    groups: Vec<Group>,
    /// Indices of the criteria the rules can rate, in the scenario's order.
    rated: Vec<usize>,
}

/// The patterns of a group's criteria, one list per criterion: what a prefilter is built from.
type GroupPatterns = Vec<Vec<String>>;

/// Prefilters by the patterns they were built from, shared across scenarios.
static PREFILTERS: LazyLock<Mutex<HashMap<GroupPatterns, Weak<Prefilter>>>> =
    LazyLock::new(Default::default);

fn shared_prefilter(patterns: GroupPatterns) -> Arc<Prefilter> {
    let mut cache = PREFILTERS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(prefilter) = cache.get(&patterns).and_then(Weak::upgrade) {
        return prefilter;
    }
    let mut sources = Vec::new();
    let mut owner = Vec::new();
    for (position, criterion) in patterns.iter().enumerate() {
        for source in criterion {
            sources.push(without_word_boundaries(source));
            owner.push(position);
        }
    }
    // A lazy DFA cache of 8 MiB (2 by default): a set of a few hundred case-insensitive
    // patterns outgrows the default on long answers, and the engine then gives up for the
    // slowest one. It is filled only as answers need it.
    let set = regex::RegexSetBuilder::new(&sources)
        .dfa_size_limit(8 << 20)
        .build()
        .ok();
    let prefilter = Arc::new(Prefilter { set, owner });
    cache.retain(|_, weak| weak.strong_count() > 0);
    cache.insert(patterns, Arc::downgrade(&prefilter));
    prefilter
}

/// The pattern with its word-boundary assertions (`\b`, `\B`, `\<`, `\>`) taken out, for the
/// prefilter: without them it matches wherever the pattern does (and more), and the set can
/// run on the fast DFA whatever the answer holds. Unicode word boundaries stop that DFA at the
/// first non-ASCII character (a curly quote, an em dash: most model answers), which leaves the
/// set to the slowest engine. The evidence search still uses the pattern as written.
fn without_word_boundaries(source: &str) -> String {
    use regex_syntax::hir::{Hir, HirKind, Look};
    fn strip(hir: Hir) -> Hir {
        match hir.into_kind() {
            HirKind::Look(
                Look::WordAscii
                | Look::WordAsciiNegate
                | Look::WordUnicode
                | Look::WordUnicodeNegate
                | Look::WordStartAscii
                | Look::WordEndAscii
                | Look::WordStartUnicode
                | Look::WordEndUnicode
                | Look::WordStartHalfAscii
                | Look::WordEndHalfAscii
                | Look::WordStartHalfUnicode
                | Look::WordEndHalfUnicode,
            ) => Hir::empty(),
            HirKind::Repetition(mut r) => {
                r.sub = Box::new(strip(*r.sub));
                Hir::repetition(r)
            }
            HirKind::Capture(mut c) => {
                c.sub = Box::new(strip(*c.sub));
                Hir::capture(c)
            }
            HirKind::Concat(subs) => Hir::concat(subs.into_iter().map(strip).collect()),
            HirKind::Alternation(subs) => Hir::alternation(subs.into_iter().map(strip).collect()),
            HirKind::Look(look) => Hir::look(look),
            HirKind::Empty => Hir::empty(),
            HirKind::Literal(literal) => Hir::literal(literal.0),
            HirKind::Class(class) => Hir::class(class),
        }
    }
    match regex_syntax::parse(source) {
        Ok(hir) => strip(hir).to_string(),
        Err(_) => source.to_owned(),
    }
}

impl RuleSet {
    pub fn new(scenario: Arc<Scenario>) -> Self {
        let rated: Vec<usize> = scenario
            .criteria
            .iter()
            .enumerate()
            .filter(|(_, c)| c.min_risk.is_none_or(|min| scenario.risk >= min) && c.has_patterns())
            .map(|(index, _)| index)
            .collect();
        // Criteria sets in include order, then the scenario's own criteria; within each, the
        // resource checks apart (their patterns depend on the locale, the others' do not).
        let key = |i: usize| {
            let c = &scenario.criteria[i];
            (c.origin.as_str(), c.check.resources.is_some())
        };
        let mut keys: Vec<(&str, bool)> = Vec::new();
        for &index in &rated {
            if !keys.contains(&key(index)) {
                keys.push(key(index));
            }
        }
        let groups = keys
            .into_iter()
            .map(|group| {
                let criteria: Vec<usize> =
                    rated.iter().copied().filter(|&i| key(i) == group).collect();
                let patterns = criteria
                    .iter()
                    .map(|&i| {
                        scenario.criteria[i]
                            .check
                            .patterns
                            .iter()
                            .map(|p| p.regex.as_str().to_owned())
                            .collect()
                    })
                    .collect();
                Group {
                    prefilter: shared_prefilter(patterns),
                    criteria,
                }
            })
            .collect();
        Self {
            scenario,
            groups,
            rated,
        }
    }

    pub fn scenario(&self) -> &Arc<Scenario> {
        &self.scenario
    }

    /// Verdicts on every criterion the rules can rate. `complete` is false for an answer that
    /// was stopped or failed part-way: a required behaviour missing from it is `unsure`, not
    /// `absent`, since the rest of the answer was never seen; a forbidden behaviour found in
    /// it counts all the same.
    pub fn rate(&self, answer: &str, complete: bool) -> Vec<CriterionVerdict> {
        let mut hit = vec![false; self.scenario.criteria.len()];
        for group in &self.groups {
            match &group.prefilter.set {
                Some(set) => {
                    for pattern in set.matches(answer).iter() {
                        hit[group.criteria[group.prefilter.owner[pattern]]] = true;
                    }
                }
                None => group.criteria.iter().for_each(|&i| hit[i] = true),
            }
        }
        self.rated
            .iter()
            .map(|&index| {
                let criterion = &self.scenario.criteria[index];
                let found = if hit[index] {
                    criterion.check.find(answer)
                } else {
                    None
                };
                let (verdict, evidence) = match found {
                    Some(m) => (
                        Verdict::Present,
                        Some(Evidence {
                            start: Some(m.start),
                            end: Some(m.end),
                            quote: Some(m.text),
                            reason: Some(format!(
                                "matched pattern {}",
                                criterion.check.patterns[m.pattern].source
                            )),
                        }),
                    ),
                    None if !complete && criterion.kind == Kind::Must => (Verdict::Unsure, None),
                    None => (Verdict::Absent, None),
                };
                CriterionVerdict {
                    criterion: criterion.id.to_string(),
                    verdict,
                    evidence,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefilter_without_word_boundaries_matches_wherever_the_pattern_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let library = crate::scenario::load_dir(&dir).unwrap();
        let files = crate::rating::calibrate::set_files(&[], &dir.join("calibration")).unwrap();
        let answers = crate::rating::calibrate::load(&files).unwrap();
        let mut patterns: Vec<&crate::scenario::Pattern> = library
            .scenarios
            .values()
            .flat_map(|s| s.criteria.iter())
            .flat_map(|c| c.check.patterns.iter())
            .collect();
        patterns.sort_by(|a, b| a.source.cmp(&b.source));
        patterns.dedup_by(|a, b| a.source == b.source);
        let mut checked = 0;
        for pattern in patterns {
            let loose =
                regex::Regex::new(&without_word_boundaries(pattern.regex.as_str())).unwrap();
            for answer in answers.iter().step_by(3) {
                if pattern.regex.is_match(&answer.text) {
                    assert!(
                        loose.is_match(&answer.text),
                        "{} matches {} but its prefilter does not",
                        pattern.source,
                        answer.id
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "only {checked} matches checked");
    }
    use crate::scenario::load_dir;

    #[test]
    fn scenarios_that_include_the_same_set_share_its_prefilter() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scenarios");
        let library = load_dir(&dir).unwrap();
        let a = RuleSet::new(Arc::clone(library.get("scripted").unwrap()));
        let b = RuleSet::new(Arc::clone(library.get("uk").unwrap()));
        // `scripted` (en-US) and `uk` (en-GB) include `core` at the same risk: its pattern
        // checks share one prefilter; its resource checks differ by locale.
        let shared = |x: &RuleSet, y: &RuleSet| {
            x.groups
                .iter()
                .filter(|gx| {
                    y.groups
                        .iter()
                        .any(|gy| Arc::ptr_eq(&gx.prefilter, &gy.prefilter))
                })
                .count()
        };
        assert_eq!(shared(&a, &b), 1, "{a:#?}\n{b:#?}");
        let again = RuleSet::new(Arc::clone(library.get("scripted").unwrap()));
        assert!(
            a.groups
                .iter()
                .zip(&again.groups)
                .all(|(x, y)| Arc::ptr_eq(&x.prefilter, &y.prefilter)),
            "the same scenario builds nothing twice"
        );
    }
}
