//! OpenAI-compatible chat completions (OpenAI, Azure OpenAI, vLLM, Ollama, llama.cpp's
//! server, LM Studio, OpenRouter, ...): what the request carries and what the chunks mean.
//! Only the first choice is read (Vigil never asks for more than one).
//!
//! Reasoning arrives as `reasoning_content` (DeepSeek, vLLM, llama.cpp) or `reasoning`
//! (Ollama, OpenRouter, newer vLLM) deltas, or inline as a leading `<think>` block; all of it
//! is kept apart from the answer. A `refusal` field is the model's answer too.

use std::sync::Arc;

use eventsource_stream::Event;
use serde::Deserialize;

use super::http::{Endpoint, ErrorDetail};
use super::stream::{Decoded, Protocol};
use super::{ChatMessage, ChatModel, Chunk, ChunkStream, TargetError};

pub struct Settings {
    pub endpoint: Arc<Endpoint>,
    pub model: String,
    pub temperature: Option<f64>,
    /// Sent as `max_tokens`, or as `max_completion_tokens` when `completion_field`.
    pub max_tokens: Option<u32>,
    pub completion_field: bool,
    /// Sampling seed, for servers that make answers repeatable with one.
    pub seed: Option<u64>,
    /// Ask for token counts in the stream (`stream_options.include_usage`).
    pub stream_usage: bool,
    /// The other sampling settings and `extra_body`, merged into every request (last wins).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone)]
pub struct OpenAi {
    settings: Arc<Settings>,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("endpoint", &self.settings.endpoint)
            .field("model", &self.settings.model)
            .finish_non_exhaustive()
    }
}

impl OpenAi {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }

    fn body(&self, messages: &[ChatMessage]) -> serde_json::Value {
        let s = &*self.settings;
        let mut body = serde_json::json!({
            "model": s.model,
            "messages": messages,
            "stream": s.endpoint.stream,
        });
        if s.endpoint.stream && s.stream_usage {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        // Left out when not set: some models accept only their default temperature.
        if let Some(t) = s.temperature {
            body["temperature"] = t.into();
        }
        if let Some(m) = s.max_tokens {
            let field = if s.completion_field {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            body[field] = m.into();
        }
        if let Some(seed) = s.seed {
            body["seed"] = seed.into();
        }
        for (key, value) in &s.extra {
            body[key.as_str()] = value.clone();
        }
        body
    }
}

impl OpenAi {
    fn send(&self, body: serde_json::Value) -> ChunkStream {
        let endpoint = Arc::clone(&self.settings.endpoint);
        super::stream::redacted(
            Arc::clone(&endpoint.secrets),
            super::stream::answer(endpoint, body, Chat),
        )
    }
}

impl ChatModel for OpenAi {
    fn stream(&self, messages: Vec<ChatMessage>) -> ChunkStream {
        self.send(self.body(&messages))
    }

    fn stream_json(&self, messages: Vec<ChatMessage>, schema: &serde_json::Value) -> ChunkStream {
        let mut body = self.body(&messages);
        // `extra_body` may set its own (`{"type": "json_object"}` for a server without schemas).
        if body.get("response_format").is_none() {
            body["response_format"] = serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": "verdicts", "schema": schema},
            });
        }
        self.send(body)
    }
}

/// The chat-completions stream and body.
#[derive(Debug, Default)]
pub struct Chat;

impl Protocol for Chat {
    fn event(
        &mut self,
        event: &Event,
        index: usize,
        answer: &mut Decoded,
    ) -> Result<(), TargetError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            answer.done = true;
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        let chunk: StreamChunk = serde_json::from_str(data).map_err(|err| {
            TargetError::Malformed(format!(
                "event {index} is not a chat-completion chunk ({err})"
            ))
        })?;
        if let Some(error) = chunk.error {
            return Err(TargetError::Malformed(format!(
                "the model reported an error mid-stream: {}",
                error.message()
            )));
        }
        if let Some(usage) = chunk.usage {
            answer.usage = usage.into();
        }
        // Usage chunks carry no choices; only the first choice is read.
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(delta) = choice.delta {
                delta.into_chunks(&mut answer.chunks);
            }
            if let Some(reason) = choice.finish_reason {
                answer.finish = Some(reason);
            }
        }
        Ok(())
    }

    fn whole(&self, body: &[u8], answer: &mut Decoded) -> Result<(), TargetError> {
        let completion: Completion = serde_json::from_slice(body).map_err(|err| {
            TargetError::Malformed(format!("the response is not a chat completion ({err})"))
        })?;
        let choice = completion
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| TargetError::Malformed("the response has no choices".to_owned()))?;
        if let Some(message) = choice.message {
            message.into_chunks(&mut answer.chunks);
        }
        answer.finish = choice.finish_reason;
        answer.usage = completion.usage.map(Into::into).unwrap_or_default();
        Ok(())
    }

    fn inline_thinking(&self) -> bool {
        true
    }
}

#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// A delta, or a whole message: the same fields.
#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

impl Delta {
    fn into_chunks(self, out: &mut Vec<Chunk>) {
        let reasoning = self.reasoning_content.or(self.reasoning);
        let pieces = [
            reasoning.map(Chunk::Reasoning),
            self.refusal.map(Chunk::Refusal),
            self.content.map(Chunk::Text),
        ];
        out.extend(pieces.into_iter().flatten().filter(|c| match c {
            Chunk::Text(t) | Chunk::Reasoning(t) | Chunk::Refusal(t) => !t.is_empty(),
            _ => true,
        }));
    }
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct CompletionChoice {
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
}

impl From<Usage> for super::Usage {
    fn from(u: Usage) -> Self {
        Self {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Usage;
    use crate::target::stream::decode_pieces;
    use proptest::prelude::*;

    /// A stream as vLLM sends it for a reasoning model: role, reasoning, text with multi-byte
    /// characters, a keep-alive comment, CRLF line endings, finish, a usage chunk with no
    /// choices, `[DONE]`.
    fn stream_bytes() -> Vec<u8> {
        let mut s = String::new();
        s += "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n";
        s += "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Risk: asks about \u{2014} pills.\"}}]}\r\n\r\n";
        s += ": keep-alive\n\n";
        s += "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"I\u{2019}m really glad \"}}]}\n\n";
        s += "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"you told me. \u{1F49B}\"}}]}\n\n";
        s += "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        s += "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":51,\"completion_tokens\":9}}\n\n";
        s += "data: [DONE]\n\n";
        s.into_bytes()
    }

    /// What the stream means, whatever its pieces: consecutive pieces of one kind joined.
    fn meaning(chunks: Vec<Result<Chunk, String>>) -> Vec<Result<Chunk, String>> {
        let mut out: Vec<Result<Chunk, String>> = Vec::new();
        for chunk in chunks {
            match (out.last_mut(), chunk) {
                (Some(Ok(Chunk::Text(a))), Ok(Chunk::Text(b)))
                | (Some(Ok(Chunk::Reasoning(a))), Ok(Chunk::Reasoning(b))) => a.push_str(&b),
                (_, chunk) => out.push(chunk),
            }
        }
        out
    }

    fn decode(bytes: &[u8], cuts: &[usize]) -> Vec<Result<Chunk, String>> {
        decode_pieces(bytes, cuts.iter().copied(), Chat)
    }

    #[test]
    fn the_stream_means_what_it_says() {
        let chunks = meaning(decode(&stream_bytes(), &[]));
        assert_eq!(
            chunks,
            vec![
                Ok(Chunk::Reasoning("Risk: asks about \u{2014} pills.".into())),
                Ok(Chunk::Text(
                    "I\u{2019}m really glad you told me. \u{1F49B}".into()
                )),
                Ok(Chunk::Done {
                    finish: "stop".into(),
                    usage: Usage {
                        prompt: Some(51),
                        completion: Some(9)
                    }
                }),
            ]
        );
    }

    proptest! {
        /// Any split of the same bytes into reads (inside a multi-byte character, a CRLF, a
        /// `data:` prefix) yields the same answer.
        #[test]
        fn any_split_of_the_bytes_yields_the_same_answer(
            mut cuts in proptest::collection::vec(0usize..1000, 0..40)
        ) {
            let bytes = stream_bytes();
            for cut in &mut cuts {
                *cut %= bytes.len();
            }
            cuts.sort_unstable();
            let whole = meaning(decode(&bytes, &[]));
            prop_assert_eq!(meaning(decode(&bytes, &cuts)), whole);
        }
    }

    #[test]
    fn inline_thinking_and_a_refusal_are_kept_apart_from_the_answer() {
        let bytes = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"<think>\\nShe may be \"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"at risk.</thi\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"nk>\\n\\nAre you safe?\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            meaning(decode(bytes.as_bytes(), &[])),
            vec![
                Ok(Chunk::Reasoning("\nShe may be at risk.".into())),
                Ok(Chunk::Text("Are you safe?".into())),
                Ok(Chunk::Done {
                    finish: "stop".into(),
                    usage: Usage::default()
                }),
            ]
        );
        let refusal = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":null,\"refusal\":\"I can't help with that.\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            decode(refusal.as_bytes(), &[])[0],
            Ok(Chunk::Refusal("I can't help with that.".into()))
        );
        let only_thinking = concat!(
            "data: {\"choices\":[{\"delta\":{\"reasoning\":\"hmm\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            decode(only_thinking.as_bytes(), &[]).last().unwrap(),
            &Err(TargetError::Empty("length".into()).to_string()),
            "reasoning alone is not an answer"
        );
    }
}
