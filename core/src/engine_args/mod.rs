//! Other engines' command lines read back into Ferry's terms: the inverse of `export`,
//! for `ferry check`, which predicts what a command a user already has will do.

pub mod llama_cpp;
pub mod vllm;

use crate::error::{CoreError, Result};

/// A command line's tokens one at a time, `--flag=value` and `--flag value` alike.
struct Flags<'a> {
    rest: &'a [String],
    index: usize,
}

impl<'a> Flags<'a> {
    fn new(rest: &'a [String]) -> Flags<'a> {
        Flags { rest, index: 0 }
    }

    /// The next token: a flag with the value written after its `=`, or a bare token.
    fn next_token(&mut self) -> Option<(&'a str, Option<String>)> {
        let token = self.rest.get(self.index)?;
        self.index += 1;
        Some(match token.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_string())),
            _ => (token.as_str(), None),
        })
    }

    /// The value of a flag that takes one: after its `=`, else the next token.
    fn value(&mut self, flag: &str, inline: Option<String>) -> Result<String> {
        if let Some(value) = inline {
            return Ok(value);
        }
        let value = self.rest.get(self.index).ok_or_else(|| CoreError::invalid(format!("{flag} needs a value")))?;
        self.index += 1;
        Ok(value.clone())
    }

    /// A flag Ferry does not read, with its value if it has one (the next token when it
    /// is not a flag; a negative number is a value), as the report lists it.
    fn ignored(&mut self, flag: &str, inline: Option<String>) -> String {
        let value = inline.or_else(|| {
            let next = self.rest.get(self.index).filter(|t| !t.starts_with('-') || t.parse::<f64>().is_ok())?;
            self.index += 1;
            Some(next.clone())
        });
        value.map_or_else(|| flag.to_string(), |v| format!("{flag} {v}"))
    }
}

/// The refusal of `flag` when a table of flags Ferry cannot model lists it.
fn refuse_unmodelled(table: &[(&[&str], &str)], flag: &str, advice: &str) -> Result<()> {
    match table.iter().find(|(names, _)| names.contains(&flag)) {
        Some((_, what)) => Err(CoreError::invalid(format!("{flag} {what}: Ferry's check does not model it; {advice}"))),
        None => Ok(()),
    }
}
