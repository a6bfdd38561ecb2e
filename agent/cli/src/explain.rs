//! `weir explain SRC DST PORT/PROTO`: the verdict of a would-be connection and why, from a
//! directory of manifests (offline) or from the agent.

use std::path::PathBuf;

use weir_policy::{
    explain::{Explanation, PortProto, Scenario, Side},
    output::Rejection,
    verdict::Reason,
};

use crate::{
    error::CliError,
    manifests,
    output::{Format, Style, encode},
};

/// Reads and compiles the manifests; warnings (duplicates, rejected policies) go to stderr.
pub fn load_scenario(paths: &[PathBuf]) -> Result<Scenario, CliError> {
    let (state, warnings) = manifests::read(paths)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let scenario = Scenario::new(state)?;
    warn_rejections(scenario.rejections());
    Ok(scenario)
}

pub fn warn_rejections(rejections: &[Rejection]) {
    for r in rejections {
        eprintln!(
            "warning: NetworkPolicy {} is rejected ({}: {}); every other policy is enforced",
            r.policy, r.field, r.reason
        );
    }
}

/// `weir explain --manifests DIR SRC DST PORT/PROTO`.
pub fn offline(
    paths: &[PathBuf],
    source: &str,
    destination: &str,
    port: &str,
    format: Format,
) -> Result<String, CliError> {
    let port: PortProto = port.parse()?;
    let scenario = load_scenario(paths)?;
    let explanation = scenario.explain(source, destination, port)?;
    render(&explanation, format)
}

pub fn render(e: &Explanation, format: Format) -> Result<String, CliError> {
    match format {
        Format::Table => Ok(describe(e, Style::detect())),
        _ => encode(format, e),
    }
}

/// The explanation for people; the first word is ALLOW or DENY.
pub fn describe(e: &Explanation, style: Style) -> String {
    let mut out = format!(
        "{} {} -> {} {}/{}\n",
        style.verdict(e.verdict.allowed()),
        e.source.pod,
        e.destination.pod,
        e.port,
        e.protocol
    );
    let addr = |ep: &weir_policy::explain::Endpoint| {
        if ep.address_assumed {
            format!("{}, address assumed", ep.address)
        } else {
            ep.address.to_string()
        }
    };
    out.push_str(&format!(
        "  {} ({}) -> {} ({})\n",
        style.dim(&e.source.identity_name),
        addr(&e.source),
        style.dim(&e.destination.identity_name),
        addr(&e.destination)
    ));
    out.push_str(&side(e, &e.egress, "source", &e.destination.pod, style));
    out.push_str(&side(e, &e.ingress, "destination", &e.source.pod, style));
    out
}

fn side(e: &Explanation, s: &Side, which: &str, peer: &str, style: Style) -> String {
    let mut out = format!(
        "{} {} of {}: {}\n",
        which,
        s.direction,
        style.bold(&s.pod),
        style.verdict(s.verdict.allowed())
    );
    if let Some(basis) = &s.basis {
        out.push_str(&format!("  ({basis})\n"));
    }
    let (to_from, policy_type) = if s.direction == "egress" {
        ("to", "Egress")
    } else {
        ("from", "Ingress")
    };
    match s.reason {
        Reason::NotIsolated => out.push_str(&format!(
            "  not isolated: no policy with policyTypes {policy_type} selects {}\n",
            s.pod
        )),
        Reason::Rule => {
            out.push_str(&format!("  selected by {}\n", s.selected_by.join(", ")));
            if let Some(r) = &s.rule {
                out.push_str(&format!(
                    "  allowed by {} (peer {}, {})\n",
                    style.good(&r.name),
                    r.peer,
                    r.ports
                ));
            }
        }
        Reason::PolicyDenied => {
            out.push_str(&format!("  selected by {}\n", s.selected_by.join(", ")));
            out.push_str(&format!(
                "  {}: no rule of these policies allows {} {to_from} {peer} on {}/{}\n",
                style.bad("denied"),
                s.direction,
                e.port,
                e.protocol
            ));
        }
    }
    out
}

/// One line naming what decided a connection: the denying side, or what allowed each side.
pub fn decided_by(e: &Explanation) -> String {
    let one = |s: &Side| match (&s.reason, &s.rule) {
        (Reason::NotIsolated, _) => format!("{} of {}: not isolated", s.direction, s.pod),
        (Reason::Rule, Some(r)) => format!("{} of {}: allowed by {}", s.direction, s.pod, r.name),
        (Reason::Rule, None) => format!("{} of {}: allowed", s.direction, s.pod),
        (Reason::PolicyDenied, _) => format!(
            "{} of {}: selected by {}; no rule allows it",
            s.direction,
            s.pod,
            s.selected_by.join(", ")
        ),
    };
    match e.deciding_side() {
        Some(denied) => one(denied),
        None => format!("{}; {}", one(&e.egress), one(&e.ingress)),
    }
}
