//! Celery's `saferepr` of JSON values: the truncated, depth-limited text Celery puts in a
//! message's `argsrepr` and `kwargsrepr` headers and in the `result` of `task-succeeded`
//! events (at most about 1,024 characters each). It differs from Python's `repr`: strings are
//! always in single quotes with only the quote escaped, containers below the third level show
//! as `[...]`, and a long value is cut with `...` while its closing brackets are kept.
//!
//! This follows the token stream of `celery.utils.saferepr` step by step, including where its
//! cut falls, so that Flower and Celery's own tools show the same text whichever worker or
//! publisher wrote it; `tests/it/interop.rs` compares it with Celery's on many values.

use std::collections::VecDeque;

use serde_json::Value;

/// The longest `argsrepr`, `kwargsrepr` and result repr Celery writes (its
/// `argsrepr_maxsize`, `kwargsrepr_maxsize` and `resultrepr_maxsize`).
pub const MAXSIZE: i64 = 1024;

/// Containers nested deeper than this show as `[...]`, `{...}` or `(...)`.
const MAX_LEVELS: i64 = 3;

/// `saferepr(tuple(args), 1024)`: a message's `argsrepr`.
pub fn args(args: &[Value]) -> String {
    saferepr(Item::Tuple(args), Some(MAXSIZE))
}

/// `saferepr(value, 1024)`: a message's `kwargsrepr`, or a task's result in its events.
pub fn value(value: &Value) -> String {
    saferepr(Item::Value(value), Some(MAXSIZE))
}

/// What is still to be written.
enum Item<'a> {
    /// Literal text: brackets and separators. Only brackets (`keep`) are written after a cut.
    Literal {
        text: &'static str,
        keep: bool,
        depth: i64,
    },
    Key(&'a str),
    Value(&'a Value),
    Tuple(&'a [Value]),
}

/// A piece of text as the stream yields it, before truncation.
enum Token<'a> {
    Literal(&'static str),
    Quoted(&'a str),
    Plain(String),
}

fn saferepr(root: Item<'_>, mut maxlen: Option<i64>) -> String {
    let mut pending = VecDeque::from([root]);
    let mut level = 0;
    let mut out = String::new();
    while let Some(token) = next_token(&mut pending, &mut level) {
        if maxlen.is_some_and(|m| m <= 0) {
            // The token that found the text full is dropped, whatever it was; the brackets
            // still open are closed.
            out.push_str(", ...");
            for item in pending {
                if let Item::Literal {
                    text, keep: true, ..
                } = item
                {
                    out.push_str(text);
                }
            }
            return out;
        }
        let piece = match token {
            Token::Literal(text) => text.to_owned(),
            Token::Quoted(text) => quoted(text, maxlen),
            Token::Plain(text) => truncate(&text, maxlen),
        };
        if let Some(m) = maxlen.as_mut() {
            *m -= piece.chars().count() as i64;
        }
        out.push_str(&piece);
    }
    out
}

/// The next token, opening containers on the way (their brackets and items go in front).
fn next_token<'a>(pending: &mut VecDeque<Item<'a>>, level: &mut i64) -> Option<Token<'a>> {
    loop {
        let (open, close, items): (&'static str, &'static str, Vec<Item<'a>>) =
            match pending.pop_front()? {
                Item::Literal { text, depth, .. } => {
                    *level += depth;
                    return Some(Token::Literal(text));
                }
                Item::Key(key) => return Some(Token::Quoted(key)),
                Item::Value(Value::Null) => return Some(Token::Plain("None".to_owned())),
                Item::Value(Value::Bool(b)) => {
                    return Some(Token::Plain(if *b { "True" } else { "False" }.to_owned()));
                }
                // Python's `str` of a number is its `repr`.
                Item::Value(number @ Value::Number(_)) => {
                    return Some(Token::Plain(super::celery::py_repr(number)));
                }
                Item::Value(Value::String(s)) => return Some(Token::Quoted(s)),
                Item::Value(Value::Array(values)) => ("[", "]", listed(values)),
                Item::Tuple(values) => {
                    let close = if values.len() == 1 { ",)" } else { ")" };
                    ("(", close, listed(values))
                }
                Item::Value(Value::Object(map)) => {
                    let mut items = Vec::with_capacity(map.len() * 4);
                    for (i, (key, value)) in map.iter().enumerate() {
                        if i > 0 {
                            items.push(separator(", "));
                        }
                        items.push(Item::Key(key));
                        items.push(separator(": "));
                        items.push(Item::Value(value));
                    }
                    ("{", "}", items)
                }
            };
        if *level >= MAX_LEVELS {
            return Some(Token::Plain(format!("{open}...{close}")));
        }
        let bracket = |text, depth| Item::Literal {
            text,
            keep: true,
            depth,
        };
        pending.push_front(bracket(close, -1));
        for item in items.into_iter().rev() {
            pending.push_front(item);
        }
        pending.push_front(bracket(open, 1));
    }
}

fn listed(values: &[Value]) -> Vec<Item<'_>> {
    let mut items = Vec::with_capacity(values.len() * 2);
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            items.push(separator(", "));
        }
        items.push(Item::Value(value));
    }
    items
}

fn separator(text: &'static str) -> Item<'static> {
    Item::Literal {
        text,
        keep: false,
        depth: 0,
    }
}

/// A string in single quotes, cut first, then only its single quotes escaped.
fn quoted(text: &str, maxlen: Option<i64>) -> String {
    format!("'{}'", truncate(text, maxlen).replace('\'', "\\'"))
}

/// Celery's `truncate`: a text of `maxlen` characters or more is cut to `maxlen`, then back to
/// its last space if it has one, and `...` added.
fn truncate(text: &str, maxlen: Option<i64>) -> String {
    let Some(max) = maxlen.filter(|m| *m > 0) else {
        return text.to_owned();
    };
    if (text.chars().count() as i64) < max {
        return text.to_owned();
    }
    let head: String = text.chars().take(max as usize).collect();
    let kept = head
        .rsplit_once(' ')
        .map_or(head.as_str(), |(before, _)| before);
    format!("{kept}...")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn short_values_read_like_celerys() {
        assert_eq!(args(&[json!(7)]), "(7,)");
        assert_eq!(args(&[]), "()");
        assert_eq!(args(&[json!(7), json!("a")]), "(7, 'a')");
        assert_eq!(
            value(&json!({"a": null, "b": true, "c": [1.5, 2.0], "d": "it's", "e": "x\"\ny"})),
            "{'a': None, 'b': True, 'c': [1.5, 2.0], 'd': 'it\\'s', 'e': 'x\"\ny'}"
        );
        assert_eq!(value(&json!([[[[1]]]])), "[[[[...]]]]");
        assert_eq!(args(&[json!({"a": [{"b": 1}]})]), "({'a': [{...}]},)");
    }

    #[test]
    fn long_values_are_cut_with_their_brackets_closed() {
        // As `saferepr(([10, 20, 30],), 8)` and `saferepr(({'k': [1, 2, 3] * 400},), 1024)`.
        assert_eq!(
            saferepr(Item::Tuple(&[json!([10, 20, 30])]), Some(8)),
            "([10, 20..., ...],)"
        );
        let counts = [1, 2, 3].repeat(400);
        let long = args(&[json!({ "k": counts })]);
        assert!(long.ends_with("2, 3, , ...]},)"), "{long}");
        assert_eq!(long.chars().count(), 1034);
        // The cut string fills the text, so the dict's own closing brace is the token dropped.
        let words = value(&json!({"notes": "ab cd ".repeat(400)}));
        assert!(words.ends_with("ab cd ab cd...', ..."), "{words}");
    }
}
