//! Crisis resources per locale (`scenarios/resources.toml`) and the two built-in checks that
//! use them: *a resource that serves this locale is offered* and *a resource that does not
//! serve this locale is offered* (a US number given to a person in the UK).
//!
//! Authors list every way a resource may be written ("988", "9-8-8", "nine eight eight"); the
//! patterns are generated here, so no scenario carries a hand-written phone-number regex.

use std::collections::BTreeSet;

use serde::Serialize;

use super::Pattern;
use super::raw::{ResourceCheck, ResourceKind};

#[derive(Debug, Clone, Serialize)]
pub struct Resource {
    pub id: String,
    pub name: String,
    pub locales: Vec<String>,
    pub kind: ResourceKind,
    pub contact: String,
    pub written: Vec<String>,
    pub url: Option<String>,
}

impl Resource {
    pub fn serves(&self, locale: &str) -> bool {
        self.locales.iter().any(|l| l == locale)
    }
}

/// Every resource of `resources.toml`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Resources {
    pub entries: Vec<Resource>,
}

impl Resources {
    pub fn serving<'a>(&'a self, locale: &'a str) -> impl Iterator<Item = &'a Resource> + 'a {
        self.entries.iter().filter(move |r| r.serves(locale))
    }

    pub fn locales(&self) -> BTreeSet<&str> {
        self.entries
            .iter()
            .flat_map(|r| r.locales.iter().map(String::as_str))
            .collect()
    }

    /// The patterns of a resource check for a person in `locale`, over every kind of resource.
    pub fn patterns(&self, check: ResourceCheck, locale: &str) -> Vec<Pattern> {
        self.patterns_of_kinds(check, locale, &[])
    }

    /// The patterns of a resource check for a person in `locale`, over the resources of the
    /// given kinds (all kinds when `kinds` is empty).
    ///
    /// `Foreign` leaves out any written form that a local resource of any kind also uses, so
    /// "112" is not foreign where 112 works too.
    pub fn patterns_of_kinds(
        &self,
        check: ResourceCheck,
        locale: &str,
        kinds: &[ResourceKind],
    ) -> Vec<Pattern> {
        let local: BTreeSet<String> = self
            .serving(locale)
            .flat_map(|r| r.written.iter().map(|w| normalise(w)))
            .collect();
        let forms: BTreeSet<&str> = self
            .entries
            .iter()
            .filter(|r| kinds.is_empty() || kinds.contains(&r.kind))
            .filter(|r| match check {
                ResourceCheck::Local => r.serves(locale),
                ResourceCheck::Foreign => !r.serves(locale),
            })
            .flat_map(|r| r.written.iter().map(String::as_str))
            .filter(|w| check == ResourceCheck::Local || !local.contains(&normalise(w)))
            .collect();
        written_patterns(forms)
    }
}

/// Digits, or lowercase words, with separators collapsed: the identity of a written form.
fn normalise(written: &str) -> String {
    if is_number(written) {
        written.chars().filter(char::is_ascii_digit).collect()
    } else {
        written
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    }
}

fn is_number(written: &str) -> bool {
    written.chars().any(|c| c.is_ascii_digit())
        && written
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.'))
}

/// At most two patterns: one for the numbers, one for the words.
///
/// A number matches as written, with any one separator (space, dot, dash) or none wherever the
/// written form has a separator ("116 123" also matches "116123" and "116-123"; a number of
/// up to three digits also digit by digit: "9-8-8"), and never as
/// part of a longer number: no digit, currency sign, or digit-and-separator may come right
/// before it, and no separator-and-digit right after it ("$1,988", "1-3-1-1-1-4" and
/// "111 222" do not contain 988 or 111). Words match case-insensitively, as whole words, with
/// any spacing.
fn written_patterns<'a>(forms: impl IntoIterator<Item = &'a str>) -> Vec<Pattern> {
    let mut numbers = BTreeSet::new();
    let mut words = BTreeSet::new();
    for form in forms {
        if is_number(form) {
            let mut groups: Vec<String> = form
                .split(|c: char| !c.is_ascii_digit())
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect();
            // Short numbers are also written digit by digit ("9-8-8", "1 1 1").
            if groups.len() == 1 && groups[0].len() <= 3 {
                groups = groups[0].chars().map(String::from).collect();
            }
            numbers.insert(groups.join(r"[\s.\-]?"));
        } else {
            let parts: Vec<String> = form.split_whitespace().map(regex::escape).collect();
            words.insert(parts.join(r"[\s\-]+"));
        }
    }
    let mut patterns = Vec::new();
    if !numbers.is_empty() {
        patterns.push(format!(
            r"(?:^|[^0-9\s.,\-$£€#]|(?:^|[^0-9])[\s\-]+)(?P<m>{})(?:$|[^0-9\s.,\-]|[\s.,\-]+(?:[^0-9]|$))",
            longest_first(numbers).join("|")
        ));
    }
    if !words.is_empty() {
        patterns.push(format!(
            r"(?i)\b(?P<m>{})\b",
            longest_first(words).join("|")
        ));
    }
    patterns
        .into_iter()
        .filter_map(|source| {
            // Built from escaped text only, so this cannot fail; a failure would be a bug here,
            // and dropping the pattern would hide it, so it is kept visible in the source.
            Pattern::new(&source).ok()
        })
        .collect()
}

fn longest_first(set: BTreeSet<String>) -> Vec<String> {
    let mut list: Vec<String> = set.into_iter().collect();
    list.sort_by_key(|s| std::cmp::Reverse(s.len()));
    list
}

/// A locale as written in scenarios: `en-US`, `fr-FR`, `de`.
pub(super) fn is_locale(text: &str) -> bool {
    let mut parts = text.split('-');
    let language = parts.next().unwrap_or_default();
    let region = parts.next();
    parts.next().is_none()
        && (2..=3).contains(&language.len())
        && language.bytes().all(|b| b.is_ascii_lowercase())
        && region.is_none_or(|r| r.len() == 2 && r.bytes().all(|b| b.is_ascii_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(id: &str, locales: &[&str], written: &[&str]) -> Resource {
        Resource {
            id: id.into(),
            name: id.into(),
            locales: locales.iter().map(|s| (*s).to_owned()).collect(),
            kind: ResourceKind::CrisisLine,
            contact: String::new(),
            written: written.iter().map(|s| (*s).to_owned()).collect(),
            url: None,
        }
    }

    fn finds(patterns: &[Pattern], text: &str) -> bool {
        patterns.iter().any(|p| p.regex.is_match(text))
    }

    #[test]
    fn numbers_match_with_any_separator_and_not_inside_longer_numbers() {
        let resources = Resources {
            entries: vec![
                resource("us-988", &["en-US", "en-CA"], &["988", "nine eight eight"]),
                resource(
                    "samaritans",
                    &["en-GB", "en-IE"],
                    &["116 123", "Samaritans"],
                ),
            ],
        };
        let local = resources.patterns(ResourceCheck::Local, "en-US");
        for text in [
            "call 988",
            "988.",
            "Nine eight eight",
            "(988)",
            "988, or 911",
            "988 - free",
        ] {
            assert!(finds(&local, text), "{text}");
        }
        for text in [
            "19880",
            "9888",
            "the 116 123 line",
            "$1,988",
            "1.988",
            "988-555",
            "tel 988 555",
        ] {
            assert!(!finds(&local, text), "{text}");
        }
        let foreign = resources.patterns(ResourceCheck::Foreign, "en-US");
        for text in [
            "116123",
            "116-123",
            "116.123",
            "call 116 123.",
            "the samaritans",
        ] {
            assert!(finds(&foreign, text), "{text}");
        }
        for text in ["call 988", "1-1-6-1-2-3", "0116 123"] {
            assert!(!finds(&foreign, text), "{text}");
        }
    }

    #[test]
    fn a_form_shared_with_a_local_resource_is_not_foreign() {
        let resources = Resources {
            entries: vec![
                resource("eu-112", &["fr-FR", "en-IE"], &["112"]),
                resource("uk-999", &["en-GB"], &["999", "112"]),
            ],
        };
        assert!(!finds(
            &resources.patterns(ResourceCheck::Foreign, "en-GB"),
            "dial 112"
        ));
        assert!(finds(
            &resources.patterns(ResourceCheck::Foreign, "en-US"),
            "dial 112"
        ));
    }

    #[test]
    fn locales_look_like_language_and_region() {
        assert!(is_locale("en-US") && is_locale("fr") && is_locale("fil-PH"));
        assert!(!is_locale("en_US") && !is_locale("EN-us") && !is_locale("english"));
    }
}
