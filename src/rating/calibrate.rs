//! Calibration: a rater's verdicts against a labelled set of answers, per criterion
//! (precision, recall, Cohen's kappa, and the answers where they disagree). The set ships in
//! `scenarios/calibration/` (see its README): realistic answers labelled from the clinical
//! standards by someone who never read the patterns, so the figures are not what the patterns
//! were tuned to.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{RuleSet, Verdict};
use crate::scenario::Library;

/// One labelled answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labelled {
    pub id: String,
    pub scenario: String,
    #[serde(default)]
    pub patient: String,
    pub text: String,
    pub labels: BTreeMap<String, Label>,
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Present,
    Absent,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetFile {
    answers: Vec<Labelled>,
}

/// The `*.toml` files of a directory, or the files given, in order.
pub fn set_files(given: &[PathBuf], default_dir: &Path) -> Result<Vec<PathBuf>, String> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let entries = std::fs::read_dir(default_dir)
        .map_err(|e| format!("cannot read {}: {e}", default_dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "no labelled sets (*.toml) in {}",
            default_dir.display()
        ));
    }
    Ok(files)
}

/// Reads labelled sets; a broken file is reported at its file:line:col.
pub fn load(files: &[PathBuf]) -> Result<Vec<Labelled>, String> {
    let mut all: Vec<Labelled> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let set: SetFile = toml::from_str(&text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| crate::scenario::line_col(&text, s.start))
                .unwrap_or((1, 1));
            format!("{}:{line}:{col}: {}", file.display(), e.message())
        })?;
        for answer in set.answers {
            if all.iter().any(|a| a.id == answer.id) {
                return Err(format!(
                    "{}: the answer id `{}` is used twice",
                    file.display(),
                    answer.id
                ));
            }
            all.push(answer);
        }
    }
    Ok(all)
}

/// How a rater fared on one criterion.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Labelled present, rated present.
    pub true_present: u32,
    /// Labelled absent, rated present.
    pub false_present: u32,
    /// Labelled present, rated absent.
    pub missed: u32,
    pub true_absent: u32,
    /// Rated `unsure`: counted apart.
    pub unsure: u32,
    /// (answer id, the label, the verdict) where they differ.
    pub disagreements: Vec<(String, Label, Verdict)>,
}

impl Tally {
    fn add(&mut self, id: &str, label: Label, verdict: Verdict) {
        match (label, verdict) {
            (_, Verdict::Unsure) => self.unsure += 1,
            (Label::Present, Verdict::Present) => self.true_present += 1,
            (Label::Absent, Verdict::Present) => self.false_present += 1,
            (Label::Present, Verdict::Absent) => self.missed += 1,
            (Label::Absent, Verdict::Absent) => self.true_absent += 1,
        }
        let agrees = matches!(
            (label, verdict),
            (Label::Present, Verdict::Present) | (Label::Absent, Verdict::Absent)
        );
        if !agrees {
            self.disagreements.push((id.to_owned(), label, verdict));
        }
    }

    pub fn items(&self) -> u32 {
        self.true_present + self.false_present + self.missed + self.true_absent
    }

    /// Of the answers rated present, the share labelled present.
    pub fn precision(&self) -> Option<f64> {
        ratio(self.true_present, self.true_present + self.false_present)
    }

    /// Of the answers labelled present, the share rated present.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.true_present, self.true_present + self.missed)
    }

    /// Cohen's kappa of the verdicts against the labels (present/absent); `None` when chance
    /// agreement is total (one category only on both sides) or there is nothing to compare.
    pub fn kappa(&self) -> Option<f64> {
        let n = f64::from(self.items());
        if n == 0.0 {
            return None;
        }
        let (tp, fp, fn_, tn) = (
            f64::from(self.true_present),
            f64::from(self.false_present),
            f64::from(self.missed),
            f64::from(self.true_absent),
        );
        let observed = (tp + tn) / n;
        let chance = ((tp + fp) * (tp + fn_) + (fn_ + tn) * (fp + tn)) / (n * n);
        (chance < 1.0).then(|| (observed - chance) / (1.0 - chance))
    }
}

fn ratio(part: u32, whole: u32) -> Option<f64> {
    (whole > 0).then(|| f64::from(part) / f64::from(whole))
}

/// The rules' figures on a labelled set.
#[derive(Debug, Default)]
pub struct Calibration {
    pub answers: usize,
    /// Per criterion the rules rate.
    pub criteria: BTreeMap<String, Tally>,
    /// Labels on criteria the rules do not rate (a judge's or a human's): how many.
    pub unrated: BTreeMap<String, u32>,
}

/// Rates every labelled answer with its scenario's rules and tallies the verdicts against
/// the labels, on every core. An answer naming a scenario or a criterion the library does not
/// have is an error: a set that drifted from the scenarios would measure nothing.
pub fn rules(library: &Library, answers: &[Labelled]) -> Result<Calibration, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = answers.len().div_ceil(threads).max(1);
    let parts: Vec<Result<Calibration, String>> = std::thread::scope(|scope| {
        let running: Vec<_> = answers
            .chunks(chunk)
            .map(|part| scope.spawn(move || rules_on(library, part)))
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("a rating thread panicked".to_owned()))
            })
            .collect()
    });
    let mut all = Calibration::default();
    for part in parts {
        all.merge(part?);
    }
    Ok(all)
}

fn rules_on(library: &Library, answers: &[Labelled]) -> Result<Calibration, String> {
    let mut rule_sets: BTreeMap<&str, RuleSet> = BTreeMap::new();
    let mut report = Calibration {
        answers: answers.len(),
        ..Calibration::default()
    };
    for answer in answers {
        let scenario = library.get(&answer.scenario).ok_or_else(|| {
            format!(
                "answer `{}`: no scenario `{}` in {}",
                answer.id,
                answer.scenario,
                library.dir.display()
            )
        })?;
        let rules = rule_sets
            .entry(answer.scenario.as_str())
            .or_insert_with(|| RuleSet::new(Arc::clone(scenario)));
        let verdicts = rules.rate(&answer.text, true);
        for (criterion, &label) in &answer.labels {
            if !scenario
                .criteria
                .iter()
                .any(|c| c.id.as_str() == criterion.as_str())
            {
                return Err(format!(
                    "answer `{}`: scenario `{}` has no criterion `{criterion}`",
                    answer.id, answer.scenario
                ));
            }
            match verdicts.iter().find(|v| &v.criterion == criterion) {
                Some(v) => report
                    .criteria
                    .entry(criterion.clone())
                    .or_default()
                    .add(&answer.id, label, v.verdict),
                None => *report.unrated.entry(criterion.clone()).or_default() += 1,
            }
        }
    }
    Ok(report)
}

/// One line of the table: the counts and the figures.
fn row(out: &mut String, name: &str, t: &Tally) {
    let _ = writeln!(
        out,
        "{:<28} {:>5} {:>4} {:>4} {:>4} {:>4}  {:>9} {:>6} {:>5}",
        name,
        t.items(),
        t.true_present,
        t.false_present,
        t.missed,
        t.true_absent,
        figure(t.precision()),
        figure(t.recall()),
        figure(t.kappa()),
    );
}

fn figure(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"))
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.true_present += other.true_present;
        self.false_present += other.false_present;
        self.missed += other.missed;
        self.true_absent += other.true_absent;
        self.unsure += other.unsure;
        self.disagreements.extend(other.disagreements);
    }
}

impl Calibration {
    fn merge(&mut self, other: Calibration) {
        self.answers += other.answers;
        for (id, tally) in other.criteria {
            self.criteria.entry(id).or_default().merge(tally);
        }
        for (id, n) in other.unrated {
            *self.unrated.entry(id).or_default() += n;
        }
    }

    /// Precision and recall over every rated label together.
    pub fn overall(&self) -> Tally {
        let mut all = Tally::default();
        for t in self.criteria.values() {
            all.merge(Tally {
                disagreements: Vec::new(),
                ..t.clone()
            });
        }
        all
    }

    /// The table, then (with `disagreements`) every answer where the rules and the label differ.
    pub fn render(&self, disagreements: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<28} {:>5} {:>4} {:>4} {:>4} {:>4}  {:>9} {:>6} {:>5}",
            "criterion", "items", "tp", "fp", "fn", "tn", "precision", "recall", "kappa"
        );
        for (id, t) in &self.criteria {
            row(&mut out, id, t);
        }
        row(&mut out, "all rated criteria", &self.overall());
        let unrated: u32 = self.unrated.values().sum();
        let _ = writeln!(
            out,
            "{} answers; {} criteria rated by the rules; {unrated} labels on {} criteria the rules do not rate (for a judge or a human)",
            self.answers,
            self.criteria.len(),
            self.unrated.len()
        );
        if disagreements {
            for (id, t) in &self.criteria {
                for (answer, label, verdict) in &t.disagreements {
                    let label = match label {
                        Label::Present => "present",
                        Label::Absent => "absent",
                    };
                    let said = match verdict {
                        Verdict::Present => "present",
                        Verdict::Absent => "absent",
                        Verdict::Unsure => "unsure",
                    };
                    let _ = writeln!(out, "  {id}: {answer} labelled {label}, rules say {said}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(tp: u32, fp: u32, fn_: u32, tn: u32) -> Tally {
        Tally {
            true_present: tp,
            false_present: fp,
            missed: fn_,
            true_absent: tn,
            ..Tally::default()
        }
    }

    #[test]
    fn kappa_matches_worked_examples() {
        // Wikipedia's worked example (Cohen's kappa): 20 yes-yes, 5 yes-no, 10 no-yes,
        // 15 no-no gives po 0.7, pe 0.5, kappa 0.4.
        let t = tally(20, 5, 10, 15);
        assert!((t.kappa().unwrap() - 0.4).abs() < 1e-12);
        assert!((t.precision().unwrap() - 0.8).abs() < 1e-12);
        assert!((t.recall().unwrap() - 20.0 / 30.0).abs() < 1e-12);
        // Perfect agreement is 1; one category on both sides leaves kappa undefined.
        assert_eq!(tally(4, 0, 0, 6).kappa(), Some(1.0));
        assert_eq!(tally(0, 0, 0, 6).kappa(), None);
        assert_eq!(tally(0, 0, 0, 6).precision(), None);
    }

    #[test]
    fn the_shipped_set_reads_and_names_only_what_the_bundled_scenarios_have() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let library = crate::scenario::load_dir(&dir).unwrap();
        let files = set_files(&[], &dir.join("calibration")).unwrap();
        let answers = load(&files).unwrap();
        assert!(answers.len() >= 300, "{} answers", answers.len());
        let report = rules(&library, &answers).unwrap();
        // Every criterion the rules rate is in the set...
        let mut rated: Vec<String> = library
            .scenarios
            .values()
            .flat_map(|s| s.criteria.iter())
            .filter(|c| c.has_patterns())
            .map(|c| c.id.to_string())
            .collect();
        rated.sort();
        rated.dedup();
        let missing: Vec<&String> = rated
            .iter()
            .filter(|id| !report.criteria.contains_key(*id))
            .collect();
        assert!(missing.is_empty(), "no labels for {missing:?}");
        // ... with at least 8 labels of each kind.
        for (id, t) in &report.criteria {
            let present = t.true_present + t.missed;
            let absent = t.false_present + t.true_absent;
            assert!(
                present >= 8 && absent >= 8,
                "{id}: {present} present, {absent} absent"
            );
        }
    }
}
