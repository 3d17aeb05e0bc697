//! Tokenisation and chat templates, as transformers does them.
//!
//! The chat template is the Jinja text from `tokenizer_config.json` (or `chat_template.jinja`),
//! rendered with minijinja under the same environment settings transformers uses
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`).
//!
//! A templated prompt is tokenised without special tokens (the template writes them, as
//! `apply_chat_template` does); a raw-text prompt for a model without a template gets the special
//! tokens `tokenizer(prompt)` adds, so a base model whose tokenizer adds BOS sees it
//! ([`RawTextSpecials`]).

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A prompt as the shards carry it: raw text or a message list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<ChatMessage>),
}

/// A tokenizer with its special tokens and chat template.
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    raw_text_specials: RawTextSpecials,
    /// What the template sees besides the messages and the special tokens
    /// ([`ChatTokenizer::set_template_variables`]).
    template_variables: serde_json::Map<String, Value>,
}

/// The variables every rendering sets itself.
const RENDERING_VARIABLES: [&str; 5] = [
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "pad_token",
];

/// The special tokens transformers' `tokenizer(text)` adds around raw text (transformers 4.x).
///
/// The tokenizer classes that rebuild `tokenizer.json`'s post-processor when they load
/// (Llama, Code Llama, Gemma, Cohere, GPT-NeoX) add BOS and EOS as `tokenizer_config.json`'s
/// `add_bos_token`/`add_eos_token` say, with their class's defaults (BOS on, except GPT-NeoX; EOS
/// off) when it does not; every other class applies the post-processor of `tokenizer.json`
/// (Llama 3's and Qwen's tokenizers, SmolLM's), whatever those flags say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawTextSpecials {
    PostProcessor,
    Flags { bos: bool, eos: bool },
}

impl RawTextSpecials {
    /// The rule of `config` (a `tokenizer_config.json`).
    pub fn of(config: &Value) -> Self {
        let class = config
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .unwrap_or("");
        let default_bos = match class.strip_suffix("Fast").unwrap_or(class) {
            "LlamaTokenizer" | "CodeLlamaTokenizer" | "GemmaTokenizer" | "CohereTokenizer" => true,
            "GPTNeoXTokenizer" => false,
            _ => return RawTextSpecials::PostProcessor,
        };
        let flag =
            |key: &str, default: bool| config.get(key).and_then(Value::as_bool).unwrap_or(default);
        RawTextSpecials::Flags {
            bos: flag("add_bos_token", default_bos),
            eos: flag("add_eos_token", false),
        }
    }
}

/// `tokenizer_config.json` writes special tokens as a string or as an AddedToken object.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The default template, or the one named "default" when the config holds a list.
fn template_text(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

impl ChatTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` and (if present) `chat_template.jinja`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer_json = std::fs::read_to_string(&tok_path)
            .with_context(|| format!("reading {}", tok_path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", cfg_path.display()))?,
            Err(_) => Value::Object(Default::default()),
        };
        let mut tokenizer = Self::from_parts(&tokenizer_json, &config)
            .with_context(|| format!("loading the tokenizer in {}", dir.display()))?;
        if let Ok(template) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
            tokenizer.template = Some(template);
        }
        Ok(tokenizer)
    }

    pub fn from_parts(tokenizer_json: &str, config: &Value) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| anyhow!("parsing tokenizer.json: {e}"))?;
        Ok(Self {
            tokenizer,
            template: template_text(config),
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
            pad_token: token_text(config.get("pad_token")),
            raw_text_specials: RawTextSpecials::of(config),
            template_variables: Default::default(),
        })
    }

    /// Variables for the chat template besides the messages and the special tokens, as
    /// transformers' `apply_chat_template(..., **kwargs)` and vLLM's `chat_template_kwargs` pass
    /// them: `{"enable_thinking": false}` makes Qwen3's template open the reply with an empty
    /// reasoning block. Refused for a tokenizer without a template (nothing would read them) and
    /// for the names each rendering sets itself.
    pub fn set_template_variables(
        &mut self,
        variables: serde_json::Map<String, Value>,
    ) -> Result<()> {
        if let Some(name) = variables
            .keys()
            .find(|name| RENDERING_VARIABLES.contains(&name.as_str()))
        {
            bail!(
                "the chat template variable '{name}' is set by the tool itself (it sets {})",
                RENDERING_VARIABLES.join(", ")
            );
        }
        if !variables.is_empty() && self.template.is_none() {
            bail!(
                "chat template variables were given, but the tokenizer has no chat_template to \
                 read them"
            );
        }
        self.template_variables = variables;
        Ok(())
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Renders `messages` with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.template.as_deref().context(
            "the tokenizer has no chat_template: give prompts as raw text or add a template",
        )?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", template)
            .context("parsing the chat template")?;
        let rendered = env
            .get_template("chat")?
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
                pad_token => self.pad_token.clone().unwrap_or_default(),
                ..minijinja::Value::from_serialize(&self.template_variables)
            })
            .map_err(|e| anyhow!("rendering the chat template: {e:#}"))?;
        Ok(rendered)
    }

    /// The text the model continues from: the templated conversation with the generation prompt.
    /// Raw text becomes a single user message when the tokenizer has a chat template, and is used
    /// verbatim otherwise.
    pub fn render_prompt(&self, prompt: &Prompt) -> Result<String> {
        match prompt {
            Prompt::Messages(messages) => self.apply_chat_template(messages, true),
            Prompt::Text(text) if self.has_chat_template() => {
                self.apply_chat_template(&[ChatMessage::new("user", text.clone())], true)
            }
            Prompt::Text(text) => Ok(text.clone()),
        }
    }

    /// Token ids of `text`, without adding special tokens (templates write them themselves).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` as transformers' `tokenizer(text)` gives them: with the special tokens
    /// of [`RawTextSpecials`].
    pub fn encode_raw_text(&self, text: &str) -> Result<Vec<u32>> {
        let RawTextSpecials::Flags { bos, eos } = self.raw_text_specials else {
            let encoding = self
                .tokenizer
                .encode(text, true)
                .map_err(|e| anyhow!("tokenizing: {e}"))?;
            return Ok(encoding.get_ids().to_vec());
        };
        let special = |on: bool, name: &str, token: &Option<String>| -> Result<Option<u32>> {
            if !on {
                return Ok(None);
            }
            match token.as_deref().and_then(|t| self.token_id(t)) {
                Some(id) => Ok(Some(id)),
                None => bail!("add_{name}_token is on but the tokenizer has no {name}_token"),
            }
        };
        let mut ids: Vec<u32> = special(bos, "bos", &self.bos_token)?.into_iter().collect();
        ids.extend(self.encode(text)?);
        ids.extend(special(eos, "eos", &self.eos_token)?);
        Ok(ids)
    }

    /// Token ids of the prompt a model continues from: the templated conversation without special
    /// tokens, or raw text (no template) as `tokenizer(prompt)` gives it.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(text) if !self.has_chat_template() => self.encode_raw_text(text),
            _ => self.encode(&self.render_prompt(prompt)?),
        }
    }

    /// The ids of the special tokens, which [`ChatTokenizer::decode`] skips (they add no text).
    pub fn special_ids(&self) -> std::collections::HashSet<u32> {
        (self.tokenizer.get_added_tokens_decoder().into_iter())
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect()
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// Prompt and response token ids by TRL's rule: the prompt is tokenised alone
    /// ([`ChatTokenizer::encode_prompt`]), the response is the response text tokenised alone
    /// followed by EOS.
    pub fn encode_pair(&self, prompt: &Prompt, response: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let prompt_ids = self.encode_prompt(prompt)?;
        let mut response_ids = self.encode(response)?;
        let eos = self
            .eos_token_id()
            .context("the tokenizer has no eos_token: set it in tokenizer_config.json")?;
        response_ids.push(eos);
        Ok((prompt_ids, response_ids))
    }

    /// Checks the tokenizer fits the model's embedding matrix.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<()> {
        let size = self.vocab_size();
        if size > model_vocab {
            bail!(
                "tokenizer has {size} tokens but the model's vocab_size is {model_vocab}: \
                 the tokenizer does not belong to this model"
            );
        }
        Ok(())
    }

    /// The raw tokenizer, for saving.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
}
