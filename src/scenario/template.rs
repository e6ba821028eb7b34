//! Prompt templates (`[simulator] prompt`, `[target] system_prompt`): minijinja with strict
//! undefined values, so a misspelt `{{ persona.nmae }}` is an error at load, not an empty
//! string in front of a model.

use minijinja::{Environment, UndefinedBehavior, Value};

/// A template error, with the 1-based line inside the template when minijinja knows it.
#[derive(Debug)]
pub(super) struct TemplateError {
    pub line_in_template: Option<usize>,
    pub message: String,
}

pub(super) fn render(source: &str, context: Value) -> Result<String, TemplateError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.render_str(source, context)
        .map_err(|err| TemplateError {
            line_in_template: err.line(),
            message: match err.detail() {
                Some(detail) => format!("template error: {detail} ({})", err.kind()),
                None => format!("template error: {}", err.kind()),
            },
        })
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
}
