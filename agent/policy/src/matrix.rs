//! Reachability matrices as people read and write them, shared by `weir explain --matrix` (what
//! the compiler decides) and the lab's probes (what real traffic did): the table's layout with
//! short pod names, and the rows of an `expected.md` (`| from | to | port | ALLOW/DENY |`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// Pod names (`namespace/name`) without their namespace when that is unambiguous.
pub fn short_names<'a>(pods: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
    let pods: BTreeSet<&str> = pods.into_iter().collect();
    let names: Vec<&str> = pods
        .iter()
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .collect();
    let unique = names.iter().collect::<BTreeSet<_>>().len() == names.len();
    pods.iter()
        .zip(names)
        .map(|(p, n)| {
            let short = if unique { n } else { p };
            (p.to_string(), short.to_owned())
        })
        .collect()
}

/// A cell's mark and how wide it shows (a coloured mark carries escape codes).
pub struct Mark {
    pub text: String,
    pub width: usize,
}

impl Mark {
    pub fn plain(text: &str) -> Self {
        Mark {
            text: text.to_owned(),
            width: text.chars().count(),
        }
    }
}

/// The table: `corner` and the column headers on the first line, then one line per row (its
/// label, then each mark centred under its header).
pub fn layout(corner: &str, headers: &[String], rows: &[(String, Vec<Mark>)]) -> String {
    let width = rows
        .iter()
        .map(|(label, _)| label.chars().count())
        .chain([corner.chars().count()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{corner:<width$}");
    for h in headers {
        let _ = write!(out, "  {h}");
    }
    out.push('\n');
    for (label, marks) in rows {
        let _ = write!(out, "{label:<width$}");
        for (mark, h) in marks.iter().zip(headers) {
            let pad = h.chars().count().saturating_sub(mark.width);
            let _ = write!(
                out,
                "  {}{}{}",
                " ".repeat(pad / 2),
                mark.text,
                " ".repeat(pad - pad / 2)
            );
        }
        out.push('\n');
    }
    out
}

/// One row of an `expected.md`: `from` reaching `to` on `port`/`protocol` is allowed or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedRow {
    pub from: String,
    pub to: String,
    pub port: u16,
    /// As written, upper-cased (`TCP`, `UDP`).
    pub protocol: String,
    pub allowed: bool,
}

/// The rows of a Markdown table with the columns `from | to | port | expected` (ALLOW/DENY;
/// more columns may follow), in order; lines that are not such rows (the header, the rule,
/// prose) are skipped. An error names the port that is not PORT/PROTO, or says no row was found.
pub fn expected_rows(markdown: &str) -> Result<Vec<ExpectedRow>, String> {
    let mut rows = Vec::new();
    for line in markdown.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() < 4 {
            continue;
        }
        let allowed = match cells[3].to_ascii_uppercase().as_str() {
            "ALLOW" => true,
            "DENY" => false,
            _ => continue,
        };
        let bad_port = || format!("port {:?} is not PORT/PROTO", cells[2]);
        let (port, protocol) = cells[2].split_once('/').ok_or_else(bad_port)?;
        rows.push(ExpectedRow {
            from: cells[0].to_owned(),
            to: cells[1].to_owned(),
            port: port.parse().map_err(|_| bad_port())?,
            protocol: protocol.to_ascii_uppercase(),
            allowed,
        });
    }
    if rows.is_empty() {
        return Err("no `| from | to | port | ALLOW/DENY |` rows found".to_owned());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_the_namespace_only_when_unambiguous() {
        let short = short_names(["a/web", "b/db"]);
        assert_eq!(short["a/web"], "web");
        let short = short_names(["a/web", "b/web"]);
        assert_eq!(short["b/web"], "b/web");
    }

    #[test]
    fn marks_are_centred_under_their_headers() {
        let table = layout(
            "from \\ to",
            &["web:80/TCP".to_owned(), "db".to_owned()],
            &[("web".to_owned(), vec![Mark::plain("-"), Mark::plain(".!")])],
        );
        assert_eq!(
            table,
            "from \\ to  web:80/TCP  db\nweb            -       .!\n"
        );
    }

    #[test]
    fn expected_rows_are_read_in_order_and_a_bad_port_is_named() {
        let rows = expected_rows(
            "| from | to | port | expected | why |\n|---|---|---|---|---|\n\
             | ns/a | ns/b | 80/tcp | DENY | because |\n| ns/b | ns/a | 53/UDP | allow | x |\n",
        )
        .unwrap();
        assert_eq!(
            rows[0],
            ExpectedRow {
                from: "ns/a".into(),
                to: "ns/b".into(),
                port: 80,
                protocol: "TCP".into(),
                allowed: false,
            }
        );
        assert!(rows[1].allowed);
        let err = expected_rows("| a | b | 80 | DENY |").unwrap_err();
        assert!(err.contains("\"80\" is not PORT/PROTO"), "{err}");
        assert!(expected_rows("prose only").is_err());
    }
}
