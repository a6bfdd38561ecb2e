//! The reachability matrix as an SVG picture: sources as rows and target ports as columns, both
//! grouped by namespace; denied cells red with a cross, allowed cells green; each cell's tooltip
//! (`<title>`) names the connection, its verdict and the rule or policies that decided it.

use std::fmt::Write as _;

use weir_policy::explain::Verdict;

use crate::matrix::Matrix;

const CELL: usize = 24;
/// Approximate advance of one character at the font size used, for sizing the margins.
const CHAR: usize = 7;
const PAD: usize = 8;

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn split(pod: &str) -> (&str, &str) {
    pod.split_once('/').unwrap_or(("", pod))
}

/// Consecutive runs of equal namespaces: `(namespace, first index, count)`.
fn groups<'a>(names: impl Iterator<Item = &'a str>) -> Vec<(&'a str, usize, usize)> {
    let mut out: Vec<(&str, usize, usize)> = Vec::new();
    for (i, ns) in names.enumerate() {
        match out.last_mut() {
            Some((last, _, n)) if *last == ns => *n += 1,
            _ => out.push((ns, i, 1)),
        }
    }
    out
}

/// Draws `m`; `title` heads the picture.
pub fn draw(m: &Matrix, title: &str) -> String {
    let row_groups = groups(m.sources.iter().map(|s| split(s).0));
    let col_groups = groups(m.targets.iter().map(|t| split(&t.pod).0));
    let col_labels: Vec<String> = m
        .targets
        .iter()
        .map(|t| format!("{} {}/{}", split(&t.pod).1, t.port, t.protocol))
        .collect();
    let ns_width = row_groups
        .iter()
        .map(|(ns, ..)| ns.len())
        .max()
        .unwrap_or(0)
        * CHAR
        + 2 * PAD;
    let name_width = m
        .sources
        .iter()
        .map(|s| split(s).1.len())
        .max()
        .unwrap_or(0)
        * CHAR
        + 2 * PAD;
    let label_height = col_labels.iter().map(String::len).max().unwrap_or(0) * CHAR + 2 * PAD;
    let title_height = 28;
    let ns_header = 20;
    let left = ns_width + name_width;
    let top = title_height + ns_header + label_height;
    let grid_w = m.targets.len() * CELL;
    let grid_h = m.sources.len() * CELL;
    let legend_h = 48;
    let width = (left + grid_w + PAD)
        .max(title.len() * 8 + 2 * PAD)
        .max(760);
    let height = top + grid_h + legend_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{PAD}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );

    // Namespace bands: rows (left) and columns (top), alternating shades behind the grid.
    for (i, (ns, first, n)) in row_groups.iter().enumerate() {
        let y = top + first * CELL;
        let fill = if i % 2 == 0 { "#f2f4f8" } else { "#e4e8f0" };
        let _ = writeln!(
            s,
            r#"<rect x="0" y="{y}" width="{left}" height="{}" fill="{fill}"/>"#,
            n * CELL
        );
        let _ = writeln!(
            s,
            r#"<text x="{PAD}" y="{}" font-weight="bold">{}</text>"#,
            y + CELL / 2 + 4,
            escape(ns)
        );
    }
    for (i, (ns, first, n)) in col_groups.iter().enumerate() {
        let x = left + first * CELL;
        let fill = if i % 2 == 0 { "#f2f4f8" } else { "#e4e8f0" };
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{title_height}" width="{}" height="{}" fill="{fill}"/>"#,
            n * CELL,
            ns_header + label_height
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-weight="bold"><title>{}</title>{}</text>"#,
            x + 4,
            title_height + 14,
            escape(ns),
            escape(&truncate(ns, n * CELL / CHAR))
        );
    }
    for (i, source) in m.sources.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            ns_width + PAD,
            top + i * CELL + CELL / 2 + 4,
            escape(split(source).1)
        );
    }
    for (j, label) in col_labels.iter().enumerate() {
        let x = left + j * CELL + CELL / 2 + 4;
        let y = top - PAD;
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{y}" transform="rotate(-90 {x} {y})">{}</text>"#,
            escape(label)
        );
    }

    // Cells.
    for (i, source) in m.sources.iter().enumerate() {
        for (j, target) in m.targets.iter().enumerate() {
            let x = left + j * CELL;
            let y = top + i * CELL;
            let (fill, mark, tip) = match m.cell(source, target) {
                Some(c) => {
                    let tip = format!(
                        "{} -> {} {}/{}: {}\n{}",
                        c.from, c.to, c.port, c.protocol, c.verdict, c.decided_by
                    );
                    match c.verdict {
                        Verdict::Allow => ("#cdebd0", "", tip),
                        Verdict::Deny => ("#f5c2c2", "\u{2715}", tip),
                    }
                }
                None => (
                    "#e0e0e0",
                    "\u{2013}",
                    format!("{source}: a pod and itself (not enforced)"),
                ),
            };
            let _ = write!(
                s,
                r#"<g class="cell"><title>{}</title><rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" fill="{fill}" stroke="white"/>"#,
                escape(&tip)
            );
            if !mark.is_empty() {
                let _ = write!(
                    s,
                    r##"<text x="{}" y="{}" text-anchor="middle" fill="#a00000" font-weight="bold">{mark}</text>"##,
                    x + CELL / 2,
                    y + CELL / 2 + 5
                );
            }
            s.push_str("</g>\n");
        }
    }

    // Group separators over the grid.
    for (_, first, _) in row_groups.iter().skip(1) {
        let y = top + first * CELL;
        let _ = writeln!(
            s,
            r##"<line x1="0" y1="{y}" x2="{}" y2="{y}" stroke="#556" stroke-width="2"/>"##,
            left + grid_w
        );
    }
    for (_, first, _) in col_groups.iter().skip(1) {
        let x = left + first * CELL;
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{title_height}" x2="{x}" y2="{}" stroke="#556" stroke-width="2"/>"##,
            top + grid_h
        );
    }

    // Legend.
    let ly = top + grid_h + 16;
    let _ = writeln!(
        s,
        r##"<rect x="{PAD}" y="{ly}" width="14" height="14" fill="#cdebd0"/><text x="{}" y="{}">allowed</text>"##,
        PAD + 20,
        ly + 12
    );
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{ly}" width="14" height="14" fill="#f5c2c2"/><text x="{}" y="{}" fill="#a00000" font-weight="bold" text-anchor="middle">{}</text><text x="{}" y="{}">denied</text>"##,
        PAD + 90,
        PAD + 97,
        ly + 12,
        "\u{2715}",
        PAD + 110,
        ly + 12
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}">rows: from; columns: to (pod port/protocol); hover a cell for the deciding rule</text>"##,
        PAD + 170,
        ly + 12
    );
    s.push_str("</svg>\n");
    s
}

fn truncate(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        text.to_owned()
    } else {
        let mut t: String = text.chars().take(chars.saturating_sub(1)).collect();
        t.push('\u{2026}');
        t
    }
}
