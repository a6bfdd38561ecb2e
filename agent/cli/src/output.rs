//! How answers are printed: tables for people (colour only on a terminal), JSON and YAML for
//! scripts. JSON and YAML are the serde form of the answer types; their field names are a
//! stable interface (golden files in tests/golden).

use std::io::IsTerminal as _;

use serde::Serialize;

use crate::error::CliError;

/// `-o`: the output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// One JSON document (pretty), for scripts.
    Json,
    /// One YAML document.
    Yaml,
}

/// Serialises `value` as JSON or YAML.
pub fn encode<T: Serialize>(format: Format, value: &T) -> Result<String, CliError> {
    match format {
        Format::Json => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| CliError::Encode(e.to_string())),
        Format::Yaml => yaml_serde::to_string(value).map_err(|e| CliError::Encode(e.to_string())),
        Format::Table => Err(CliError::Encode(
            "a table is not a serialisation".to_owned(),
        )),
    }
}

/// Terminal colours: on only when stdout is a terminal and `NO_COLOR` is not set.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    pub fn detect() -> Self {
        Style {
            colour: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    pub fn good(&self, text: &str) -> String {
        self.paint("32", text)
    }

    pub fn bad(&self, text: &str) -> String {
        self.paint("31", text)
    }

    pub fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }

    pub fn dim(&self, text: &str) -> String {
        self.paint("2", text)
    }

    /// ALLOW in green, DENY in red.
    pub fn verdict(&self, allowed: bool) -> String {
        if allowed {
            self.good("ALLOW")
        } else {
            self.bad("DENY")
        }
    }
}
/// A table: a header row and rows, columns padded to their widest cell. Colour codes in cells
/// are not counted in the width.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let visible = |s: &str| {
        let mut n = 0;
        let mut in_escape = false;
        for c in s.chars() {
            match (in_escape, c) {
                (false, '\x1b') => in_escape = true,
                (true, 'm') => in_escape = false,
                (true, _) => {}
                (false, _) => n += 1,
            }
        }
        n
    };
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(visible(cell));
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.into_iter().enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - visible(cell) + 2));
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}
