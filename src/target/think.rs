//! Inline reasoning: models served without a reasoning parser (DeepSeek-R1, Qwen3, QwQ on a
//! plain llama.cpp or vLLM) open their answer with `<think>...</think>`. Only a block that
//! opens the answer (after white space) counts, so an answer that mentions the tag later is
//! left as it is; the tags may be split across pieces anywhere.

use super::Chunk;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Default)]
pub struct Think {
    state: State,
    /// Text held back until it can be told apart (a possible start or end of a tag).
    pending: String,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum State {
    /// Nothing but white space so far.
    #[default]
    Start,
    Inside,
    /// Just after `</think>`: the white space before the answer is dropped.
    AfterClose,
    Answer,
}

impl Think {
    /// Splits one piece of answer text into answer and reasoning.
    pub fn split(&mut self, piece: &str, out: &mut Vec<Chunk>) {
        self.pending.push_str(piece);
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.pending.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.pending = rest.to_owned();
                        self.state = State::Inside;
                    } else if OPEN.starts_with(trimmed) {
                        return; // all white space, or a tag begun: wait for more
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Inside => {
                    if let Some(at) = self.pending.find(CLOSE) {
                        let reasoning: String = self.pending.drain(..at).collect();
                        self.pending.drain(..CLOSE.len());
                        push(out, Chunk::Reasoning(reasoning));
                        self.state = State::AfterClose;
                    } else {
                        // Keep back what may be the start of `</think>`.
                        let keep = partial_suffix(&self.pending, CLOSE);
                        let cut = self.pending.len() - keep;
                        let reasoning: String = self.pending.drain(..cut).collect();
                        push(out, Chunk::Reasoning(reasoning));
                        return;
                    }
                }
                State::AfterClose => {
                    let trimmed = self.pending.trim_start();
                    if trimmed.is_empty() {
                        self.pending.clear();
                        return;
                    }
                    self.pending = trimmed.to_owned();
                    self.state = State::Answer;
                }
                State::Answer => {
                    let text = std::mem::take(&mut self.pending);
                    push(out, Chunk::Text(text));
                    return;
                }
            }
        }
    }

    /// What is still held back when the answer ends.
    pub fn finish(&mut self, out: &mut Vec<Chunk>) {
        let rest = std::mem::take(&mut self.pending);
        match self.state {
            State::Inside => push(out, Chunk::Reasoning(rest)),
            State::Start | State::Answer => push(out, Chunk::Text(rest)),
            State::AfterClose => {}
        }
    }
}

fn push(out: &mut Vec<Chunk>, chunk: Chunk) {
    match &chunk {
        Chunk::Text(t) | Chunk::Reasoning(t) if t.is_empty() => {}
        _ => out.push(chunk),
    }
}

/// Length of the longest end of `text` that is a proper start of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.is_char_boundary(text.len().saturating_sub(n)) && text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> (String, String) {
        let mut think = Think::default();
        let mut out = Vec::new();
        for p in pieces {
            think.split(p, &mut out);
        }
        think.finish(&mut out);
        let (mut text, mut reasoning) = (String::new(), String::new());
        for c in out {
            match c {
                Chunk::Text(t) => text += &t,
                Chunk::Reasoning(r) => reasoning += &r,
                other => panic!("{other:?}"),
            }
        }
        (text, reasoning)
    }

    #[test]
    fn a_leading_think_block_is_reasoning_however_it_is_split() {
        let whole = "\n<think>She said tonight. Ask directly.</think>\n\nAre you thinking of ending your life?";
        let expected = (
            "Are you thinking of ending your life?".to_owned(),
            "She said tonight. Ask directly.".to_owned(),
        );
        assert_eq!(run(&[whole]), expected);
        for cut in 1..whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(run(&[a, b]), expected, "split at {cut}");
        }
        let bytes: Vec<String> = whole.chars().map(String::from).collect();
        let pieces: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(run(&pieces), expected);
    }

    #[test]
    fn a_tag_later_in_the_answer_or_an_unclosed_block_is_kept_as_it_is() {
        assert_eq!(
            run(&["Models write <think>", " tags."]),
            ("Models write <think> tags.".to_owned(), String::new())
        );
        assert_eq!(
            run(&["<think>still thinking when cut"]),
            (String::new(), "still thinking when cut".to_owned())
        );
        assert_eq!(
            run(&["<thi", "s is not"]),
            ("<this is not".to_owned(), String::new())
        );
    }
}
