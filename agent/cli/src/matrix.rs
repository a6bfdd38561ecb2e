//! `weir explain --manifests DIR --matrix`: every pod to every declared port of every other pod.

use std::collections::BTreeSet;

use serde::Serialize;
use weir_policy::explain::{PortProto, Protocol, Scenario, Verdict};
use weir_policy::matrix::{Mark, layout, short_names};

use crate::{
    error::CliError,
    explain::decided_by,
    output::{Format, Style, encode},
};

/// A column: one port of one pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Target {
    pub pod: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// One would-be connection. Pairs of a pod with itself are not in the matrix (traffic to its own
/// address never leaves the pod and is not enforced).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub verdict: Verdict,
    /// The denying side's policies, or what allowed each side.
    pub decided_by: String,
}

/// A rejected policy: it enforces nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RejectedPolicy {
    pub policy: String,
    pub field: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// Rows: every pod, by namespace then name.
    pub sources: Vec<String>,
    /// Columns: every port each pod declares, and the `--port` extras on every pod.
    pub targets: Vec<Target>,
    pub cells: Vec<Cell>,
    pub rejected_policies: Vec<RejectedPolicy>,
}

impl Matrix {
    pub fn build(scenario: &Scenario, extra_ports: &[PortProto]) -> Result<Self, CliError> {
        let sources: Vec<String> = scenario.pods().keys().map(ToString::to_string).collect();
        let mut targets = Vec::new();
        for (key, pod) in scenario.pods() {
            let mut ports: BTreeSet<PortProto> = pod.ports.iter().copied().collect();
            ports.extend(extra_ports.iter().copied());
            for p in ports {
                targets.push(Target {
                    pod: key.to_string(),
                    port: p.port,
                    protocol: p.protocol,
                });
            }
        }
        let mut cells = Vec::new();
        for from in &sources {
            for t in &targets {
                if *from == t.pod {
                    continue;
                }
                let port = PortProto {
                    port: t.port,
                    protocol: t.protocol,
                };
                let e = scenario.explain(from, &t.pod, port)?;
                cells.push(Cell {
                    from: from.clone(),
                    to: t.pod.clone(),
                    port: t.port,
                    protocol: t.protocol,
                    verdict: e.verdict,
                    decided_by: decided_by(&e),
                });
            }
        }
        let rejected_policies = scenario
            .rejections()
            .iter()
            .map(|r| RejectedPolicy {
                policy: r.policy.to_string(),
                field: r.field.clone(),
                reason: r.reason.clone(),
            })
            .collect();
        Ok(Matrix {
            sources,
            targets,
            cells,
            rejected_policies,
        })
    }

    pub fn cell(&self, from: &str, to: &Target) -> Option<&Cell> {
        self.cells.iter().find(|c| {
            c.from == from && c.to == to.pod && c.port == to.port && c.protocol == to.protocol
        })
    }

    pub fn render(&self, format: Format) -> Result<String, CliError> {
        match format {
            Format::Table => Ok(self.table(Style::detect())),
            _ => encode(format, self),
        }
    }

    /// Rows from, columns to:port/proto; `.` allowed, `X` denied, `-` a pod and itself.
    pub fn table(&self, style: Style) -> String {
        let short = short_names(self.sources.iter().map(String::as_str));
        let headers: Vec<String> = self
            .targets
            .iter()
            .map(|t| format!("{}:{}/{}", short[&t.pod], t.port, t.protocol))
            .collect();
        let rows: Vec<(String, Vec<Mark>)> = self
            .sources
            .iter()
            .map(|source| {
                let marks = self
                    .targets
                    .iter()
                    .map(|t| Mark {
                        text: match self.cell(source, t).map(|c| c.verdict) {
                            Some(Verdict::Allow) => style.good("."),
                            Some(Verdict::Deny) => style.bad("X"),
                            None => "-".to_owned(),
                        },
                        width: 1,
                    })
                    .collect();
                (short[source].clone(), marks)
            })
            .collect();
        let mut out = layout("from \\ to", &headers, &rows);
        out.push_str("(. allowed, X denied, - a pod and itself)\n");
        let denied: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| c.verdict == Verdict::Deny)
            .collect();
        if !denied.is_empty() {
            out.push_str("\ndenied:\n");
            for c in denied {
                out.push_str(&format!(
                    "  {} -> {} {}/{}: {}\n",
                    c.from, c.to, c.port, c.protocol, c.decided_by
                ));
            }
        }
        out
    }
}
