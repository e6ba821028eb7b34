//! The raw mirror of the files: serde structs with `deny_unknown_fields`, spans kept where a
//! later check needs to point at a value. Nothing here is validated beyond its TOML type; see
//! `load.rs` for the checks that turn these into [`super::Scenario`].
//!
//! The arrays of tables (`[[criteria]]`, `[[script]]`, `[[markers]]`, `[[resources]]`) are
//! deserialized one element at a time, so that a mistake in one criterion does not hide the
//! mistakes in the next.

use serde::Deserialize;
use toml::Spanned;

use super::{Kind, Risk, Scope, Severity};

/// A scenario file without its arrays of tables and without `include` (a list of criteria
/// set names, read on its own so that a mistake in the head does not hide the includes).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioHead {
    pub id: Spanned<String>,
    pub title: String,
    pub version: Spanned<i64>,
    pub risk: Risk,
    pub locale: Spanned<String>,
    pub content_warning: String,
    #[serde(default)]
    pub description: Option<String>,
    pub persona: Persona,
    #[serde(default)]
    pub simulator: Option<Spanned<Prompt>>,
    #[serde(default)]
    pub target: Option<Spanned<TargetPrompt>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persona {
    pub name: String,
    #[serde(default)]
    pub age: Option<u32>,
    #[serde(default)]
    pub pronouns: Option<String>,
    pub summary: String,
    #[serde(default)]
    pub background: Option<String>,
}

/// `[simulator] prompt = "..."`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    pub prompt: Spanned<String>,
}

/// `[target] system_prompt = "..."`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetPrompt {
    pub system_prompt: Spanned<String>,
}

/// A criteria set file (`criteria/*.toml`) without its arrays of tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriteriaSetHead {
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptLine {
    pub say: Spanned<String>,
    #[serde(default)]
    pub when: Option<Spanned<String>>,
    #[serde(default)]
    pub otherwise: Option<Spanned<String>>,
    #[serde(default)]
    pub marks: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    pub id: Spanned<String>,
    pub text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criterion {
    pub id: Spanned<String>,
    pub text: String,
    pub kind: Kind,
    #[serde(default)]
    pub scope: Option<Scope>,
    pub severity: Severity,
    #[serde(default)]
    pub after: Option<Spanned<String>>,
    #[serde(default)]
    pub within: Option<Spanned<i64>>,
    #[serde(default)]
    pub min_risk: Option<Risk>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub check: Option<Check>,
    #[serde(default)]
    pub examples: Option<Examples>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    #[serde(default)]
    pub patterns: Vec<Spanned<String>>,
    #[serde(default)]
    pub unless: Vec<Spanned<String>>,
    #[serde(default)]
    pub judge: Option<String>,
    #[serde(default)]
    pub resources: Option<Spanned<ResourceCheck>>,
    /// With `resources`: only resources of these kinds count (all kinds when absent).
    #[serde(default)]
    pub resource_kinds: Vec<ResourceKind>,
}

/// `check.resources`: the built-in crisis-resource checks driven by `resources.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceCheck {
    /// A resource that serves the scenario's locale is mentioned.
    Local,
    /// A resource that does not serve the scenario's locale is mentioned.
    Foreign,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Examples {
    #[serde(default)]
    pub present: Vec<Spanned<String>>,
    #[serde(default)]
    pub absent: Vec<Spanned<String>>,
    /// For resource checks: the locale the examples are written for.
    #[serde(default)]
    pub locale: Option<Spanned<String>>,
}

/// One `[[resources]]` entry of `resources.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    pub id: Spanned<String>,
    pub name: String,
    pub locales: Vec<Spanned<String>>,
    pub kind: ResourceKind,
    /// How a person reaches it, as a model should say it ("call or text 988").
    pub contact: String,
    /// Every way the resource may be written in an answer: numbers ("116 123"), spelled out
    /// ("nine eight eight"), names ("Samaritans").
    pub written: Vec<Spanned<String>>,
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    CrisisLine,
    TextLine,
    Emergency,
}
