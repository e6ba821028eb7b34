//! Prompt templates (`[simulator] prompt`, `[target] system_prompt`): minijinja with strict
//! undefined values, so a misspelt `{{ persona.nmae }}` is an error at load, not an empty
//! string in front of a model.
//!
//! A template is written by whoever writes scenario files, and rendered when the server starts
//! and by `vigil lint`: it runs on a budget ([`FUEL`]: minijinja charges every instruction and
//! every byte it produces, checking large allocations before making them), so an endless loop
//! or a string that doubles itself is an error at its line, not a hung or crashed server; and
//! a prompt longer than [`MAX_PROMPT_CHARS`] is refused.

use minijinja::{Environment, UndefinedBehavior, Value};

/// A template error, with the 1-based line inside the template when minijinja knows it.
#[derive(Debug)]
pub(super) struct TemplateError {
    pub line_in_template: Option<usize>,
    pub message: String,
}

/// The work one template may make the engine do: an instruction costs one, every 64 bytes
/// produced one (so at most about 6 MB of data in all). A real prompt uses a few hundred.
pub const FUEL: u64 = 100_000;

/// Longest rendered prompt, in characters.
pub const MAX_PROMPT_CHARS: usize = 32_000;

pub(super) fn render(source: &str, context: Value) -> Result<String, TemplateError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    let text = env
        .render_str(source, context)
        .map_err(|err| TemplateError {
            line_in_template: err.line(),
            message: match (err.kind(), err.detail()) {
                (minijinja::ErrorKind::OutOfFuel, _) => format!(
                    "template error: the template does more work than a prompt needs (a loop \
                     or a growing string?) and was stopped ({FUEL} fuel)"
                ),
                (kind, Some(detail)) => format!("template error: {detail} ({kind})"),
                (kind, None) => format!("template error: {kind}"),
            },
        })?;
    let chars = text.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(TemplateError {
            line_in_template: None,
            message: format!(
                "template error: the prompt is {chars} characters long; at most {MAX_PROMPT_CHARS}"
            ),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_rejects_undefined_names() {
        let ctx = minijinja::context! { persona => minijinja::context! { name => "Jordan" } };
        assert_eq!(
            render("I am {{ persona.name }}.", ctx.clone()).unwrap(),
            "I am Jordan."
        );
        let err = render("line one\nI am {{ persona.nmae }}.", ctx.clone()).unwrap_err();
        assert_eq!(err.line_in_template, Some(2));
        let err = render("{% if %}", ctx).unwrap_err();
        assert!(err.message.contains("syntax"), "{}", err.message);
    }

    #[test]
    fn a_template_that_loops_or_grows_without_end_is_stopped_at_its_line() {
        let ctx = minijinja::context! { persona => minijinja::context! { name => "Jordan" } };
        let started = std::time::Instant::now();
        let cases = [
            // A 10^10 loop.
            "You are {{ persona.name }}.\n{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            // A string that doubles itself.
            "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s }}{% endif %}{% endmacro %}\n{{ d('a', 40) }}",
            // A string bomb.
            "{{ 'a' * 1000000000 }}",
            // Output past the prompt limit.
            "{{ 'ab' * 20000 }}",
        ];
        for source in cases {
            let err = render(source, ctx.clone()).unwrap_err();
            assert!(err.message.starts_with("template error"), "{}", err.message);
        }
        assert!(
            render(cases[0], ctx).unwrap_err().line_in_template == Some(2),
            "the loop's line is reported"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}
