//! The rules rater: every pattern of a scenario in one `RegexSet`, compiled once per scenario
//! version, as a prefilter; only the criteria whose patterns hit are then searched for their
//! evidence span (with their `unless` vetoes), through the same [`Check::find`] that the lint
//! runs on the examples. So the engine and the examples cannot disagree.
//!
//! [`Check::find`]: crate::scenario::Check::find

use std::sync::Arc;

use regex::RegexSet;

use super::{CriterionVerdict, Evidence, Verdict};
use crate::scenario::{Kind, Scenario};

/// The compiled rules of one scenario version.
#[derive(Debug)]
pub struct RuleSet {
    scenario: Arc<Scenario>,
    /// All patterns of the criteria that apply at the scenario's risk level; `None` when the
    /// combined set is too large for the regex engine, in which case every criterion is
    /// searched on its own (slower, same verdicts).
    prefilter: Option<RegexSet>,
    /// For each pattern of the prefilter, the index of its criterion.
    owner: Vec<usize>,
    /// Indices of the criteria the rules can rate.
    rated: Vec<usize>,
}

impl RuleSet {
    pub fn new(scenario: Arc<Scenario>) -> Self {
        let mut sources = Vec::new();
        let mut owner = Vec::new();
        let mut rated = Vec::new();
        for (index, criterion) in scenario.criteria.iter().enumerate() {
            let applies = criterion.min_risk.is_none_or(|min| scenario.risk >= min);
            if !applies || !criterion.has_patterns() {
                continue;
            }
            rated.push(index);
            for pattern in &criterion.check.patterns {
                sources.push(pattern.source.as_str());
                owner.push(index);
            }
        }
        let prefilter = RegexSet::new(&sources).ok();
        Self {
            scenario,
            prefilter,
            owner,
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
        match &self.prefilter {
            Some(set) => {
                for pattern in set.matches(answer).iter() {
                    hit[self.owner[pattern]] = true;
                }
            }
            None => hit.iter_mut().for_each(|h| *h = true),
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
