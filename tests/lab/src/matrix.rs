//! Reachability matrices: what a probe found, what was expected, and the differences, as a table
//! for people and as JSON for scripts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use weir_policy::matrix::{Mark, expected_rows, layout, short_names};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

impl std::str::FromStr for Proto {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            other => bail!("unknown protocol {other:?} (TCP or UDP)"),
        }
    }
}

/// A pod's port: the column of a matrix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    /// `namespace/name`
    pub pod: String,
    pub port: u16,
    pub proto: Proto,
}

impl Target {
    pub fn new(pod: &str, port: u16, proto: Proto) -> Self {
        Target {
            pod: pod.to_string(),
            port,
            proto,
        }
    }
}

/// One cell of a matrix, as JSON shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub proto: Proto,
    pub allowed: bool,
}

/// Reachability from every source pod to every target port. Pairs a pod has with itself are not
/// probed (traffic to its own address never leaves the pod and is not enforced).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matrix {
    pub sources: Vec<String>,
    pub targets: Vec<Target>,
    pub cells: BTreeMap<(String, Target), bool>,
}

#[derive(Serialize, Deserialize)]
struct MatrixJson {
    sources: Vec<String>,
    targets: Vec<Target>,
    results: Vec<Cell>,
}

impl Matrix {
    pub fn get(&self, from: &str, to: &Target) -> Option<bool> {
        self.cells.get(&(from.to_string(), to.clone())).copied()
    }

    pub fn cells(&self) -> Vec<Cell> {
        self.cells
            .iter()
            .map(|((from, t), &allowed)| Cell {
                from: from.clone(),
                to: t.pod.clone(),
                port: t.port,
                proto: t.proto,
                allowed,
            })
            .collect()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&MatrixJson {
            sources: self.sources.clone(),
            targets: self.targets.clone(),
            results: self.cells(),
        })
        .expect("a matrix serializes")
    }

    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let json: MatrixJson = serde_json::from_str(text)?;
        let mut m = Matrix {
            sources: json.sources,
            targets: json.targets,
            cells: BTreeMap::new(),
        };
        for c in json.results {
            m.cells
                .insert((c.from, Target::new(&c.to, c.port, c.proto)), c.allowed);
        }
        Ok(m)
    }

    /// The table for people: rows from, columns to:port/proto; `.` allowed, `X` denied, `-` not
    /// probed. Cells that differ from `expect` are marked `!`.
    pub fn render(&self, expect: Option<&Expectations>) -> String {
        let short = short_names(
            self.sources
                .iter()
                .map(String::as_str)
                .chain(self.targets.iter().map(|t| t.pod.as_str())),
        );
        let one_port = {
            let ports: BTreeSet<(u16, Proto)> =
                self.targets.iter().map(|t| (t.port, t.proto)).collect();
            (ports.len() == 1).then(|| *ports.iter().next().expect("one"))
        };
        let headers: Vec<String> = self
            .targets
            .iter()
            .map(|t| match one_port {
                Some(_) => short[t.pod.as_str()].clone(),
                None => format!("{}:{}/{}", short[t.pod.as_str()], t.port, t.proto),
            })
            .collect();
        let corner = match one_port {
            Some((port, proto)) => format!("from \\ to ({port}/{proto})"),
            None => "from \\ to".to_string(),
        };
        let rows: Vec<(String, Vec<Mark>)> = self
            .sources
            .iter()
            .map(|source| {
                let marks = self
                    .targets
                    .iter()
                    .map(|t| {
                        let got = self.get(source, t);
                        let want = expect.and_then(|e| e.get(source, t));
                        let mut mark = match got {
                            Some(true) => ".".to_string(),
                            Some(false) => "X".to_string(),
                            None => "-".to_string(),
                        };
                        if let (Some(g), Some(w)) = (got, want)
                            && g != w
                        {
                            mark.push('!');
                        }
                        Mark::plain(&mark)
                    })
                    .collect();
                (short[source.as_str()].clone(), marks)
            })
            .collect();
        layout(&corner, &headers, &rows)
    }

    /// Cells whose observed value differs from the expectation.
    pub fn differences(&self, expect: &Expectations) -> Vec<Difference> {
        let mut diffs = Vec::new();
        for ((from, target), &got) in &self.cells {
            if let Some(want) = expect.get(from, target)
                && want != got
            {
                diffs.push(Difference {
                    from: from.clone(),
                    to: target.clone(),
                    expected: want,
                    observed: got,
                });
            }
        }
        diffs
    }

    /// Expectations this matrix names that it did not probe.
    pub fn unprobed(&self, expect: &Expectations) -> Vec<(String, Target)> {
        expect
            .entries
            .keys()
            .filter(|k| !self.cells.contains_key(*k))
            .cloned()
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub from: String,
    pub to: Target,
    pub expected: bool,
    pub observed: bool,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = |b: bool| if b { "ALLOW" } else { "DENY" };
        write!(
            f,
            "{} -> {} {}/{}: expected {}, observed {}",
            self.from,
            self.to.pod,
            self.to.port,
            self.to.proto,
            word(self.expected),
            word(self.observed)
        )
    }
}

pub fn render_differences(diffs: &[Difference]) -> String {
    if diffs.is_empty() {
        return "no differences from the expectations\n".to_string();
    }
    let mut out = format!("{} difference(s) from the expectations:\n", diffs.len());
    for d in diffs {
        let _ = writeln!(out, "  {d}");
    }
    out
}

/// What `lab probe` prints: the matrix (JSON, or the table marked against `expect`) on stdout,
/// and the differences from `expect` on stderr. An error when the matrix differs, so the
/// command's exit status says whether the expectations held.
pub fn report(matrix: &Matrix, expect: Option<&Expectations>, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", matrix.to_json());
    } else {
        print!("{}", matrix.render(expect));
    }
    if let Some(e) = expect {
        let diffs = matrix.differences(e);
        eprint!("{}", render_differences(&diffs));
        if !diffs.is_empty() {
            bail!("the matrix differs from {} expectation(s)", diffs.len());
        }
    }
    Ok(())
}

/// Expected reachability: explicit cells, and a default for cells not named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expectations {
    pub default: Option<bool>,
    pub entries: BTreeMap<(String, Target), bool>,
    /// The cells in the order they were first set (a file's order).
    pub order: Vec<(String, Target)>,
}

impl Expectations {
    /// Every cell `default` (the upstream suites start from "all allowed").
    pub fn all(default: bool) -> Self {
        Expectations {
            default: Some(default),
            entries: BTreeMap::new(),
            order: Vec::new(),
        }
    }

    pub fn get(&self, from: &str, to: &Target) -> Option<bool> {
        self.entries
            .get(&(from.to_string(), to.clone()))
            .copied()
            .or(self.default)
    }

    pub fn set(&mut self, from: &str, to: Target, allowed: bool) {
        let key = (from.to_string(), to);
        if self.entries.insert(key.clone(), allowed).is_none() {
            self.order.push(key);
        }
    }

    /// Reads expectations from a file: JSON (a list of cells, or a matrix), or a Markdown table
    /// with the columns `from | to | port | expected` (ALLOW/DENY), like the examples'
    /// `expected.md`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            let cells: Vec<Cell> = match serde_json::from_str::<Vec<Cell>>(&text) {
                Ok(cells) => cells,
                Err(_) => Matrix::from_json(&text)?.cells(),
            };
            let mut e = Expectations::default();
            for c in cells {
                e.set(&c.from, Target::new(&c.to, c.port, c.proto), c.allowed);
            }
            return Ok(e);
        }
        Self::from_markdown(&text)
    }

    /// See [`weir_policy::matrix::expected_rows`].
    pub fn from_markdown(text: &str) -> anyhow::Result<Self> {
        let mut e = Expectations::default();
        for row in expected_rows(text).map_err(anyhow::Error::msg)? {
            e.set(
                &row.from,
                Target::new(&row.to, row.port, row.protocol.parse()?),
                row.allowed,
            );
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_expectations_and_differences() {
        let e = Expectations::from_markdown(
            "| from | to | port | expected | why |\n|---|---|---|---|---|\n\
             | ns/a | ns/b | 80/TCP | DENY | because |\n| ns/b | ns/a | 53/UDP | ALLOW | x |\n",
        )
        .unwrap();
        assert_eq!(e.entries.len(), 2);
        let mut m = Matrix {
            sources: vec!["ns/a".into(), "ns/b".into()],
            targets: vec![
                Target::new("ns/b", 80, Proto::Tcp),
                Target::new("ns/a", 53, Proto::Udp),
            ],
            cells: BTreeMap::new(),
        };
        m.cells
            .insert(("ns/a".into(), Target::new("ns/b", 80, Proto::Tcp)), true);
        m.cells
            .insert(("ns/b".into(), Target::new("ns/a", 53, Proto::Udp)), true);
        let diffs = m.differences(&e);
        assert_eq!(diffs.len(), 1);
        assert!(
            diffs[0]
                .to_string()
                .contains("expected DENY, observed ALLOW")
        );
        let table = m.render(Some(&e));
        assert!(table.contains(".!"), "{table}");
        assert_eq!(Matrix::from_json(&m.to_json()).unwrap(), m);
    }
}
