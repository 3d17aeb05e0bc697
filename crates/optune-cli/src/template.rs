//! `--chat-template-kwargs`: variables for the model's chat template.

use anyhow::{Context, Result};
use optune_checkpoint::ChatTokenizer;

/// `--chat-template-kwargs`: flatten into the clap struct of a tool that renders chat templates.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ChatTemplateArgs {
    /// A JSON object of variables for the chat template besides the messages, as transformers'
    /// apply_chat_template(**kwargs) and vLLM's chat_template_kwargs pass them, e.g.
    /// '{"enable_thinking": false}' for Qwen3 replies without a reasoning block. opt-gen and
    /// opt-wdpo must be given the same (a prompt's tokens are its rendering); opt-score's apply
    /// to the reward model's template [default: none]
    #[arg(long, value_name = "JSON")]
    pub chat_template_kwargs: Option<String>,
}

impl ChatTemplateArgs {
    /// The variables given (none when the flag is absent); an error for anything but a JSON
    /// object. Tools call it before loading a model, so that a typo fails at once.
    pub fn variables(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let Some(text) = &self.chat_template_kwargs else {
            return Ok(Default::default());
        };
        let value: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("--chat-template-kwargs {text:?} is not JSON"))?;
        match value {
            serde_json::Value::Object(variables) => Ok(variables),
            _ => anyhow::bail!(
                "--chat-template-kwargs must be a JSON object such as '{{\"enable_thinking\": \
                 false}}', not {text:?}"
            ),
        }
    }

    /// Hands the variables to `tokenizer` (nothing when the flag is absent).
    pub fn apply_to(&self, tokenizer: &mut ChatTokenizer) -> Result<()> {
        tokenizer
            .set_template_variables(self.variables()?)
            .context("--chat-template-kwargs")
    }
}

#[cfg(test)]
mod tests {
    use super::ChatTemplateArgs;

    fn variables(text: &str) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        let args = ChatTemplateArgs {
            chat_template_kwargs: Some(text.into()),
        };
        args.variables()
    }

    #[test]
    fn takes_a_json_object_and_names_the_flag_otherwise() {
        let parsed = variables(r#"{"enable_thinking": false, "n": 2}"#).unwrap();
        assert_eq!(parsed["enable_thinking"], serde_json::json!(false));
        assert_eq!(parsed["n"], serde_json::json!(2));
        assert!(ChatTemplateArgs::default().variables().unwrap().is_empty());
        for bad in ["enable_thinking=false", "[1, 2]", "false"] {
            let error = format!("{:#}", variables(bad).unwrap_err());
            assert!(error.contains("--chat-template-kwargs"), "{error}");
        }
    }
}
