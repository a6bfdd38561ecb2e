//! `weir explain --manifests`: the CLI as users run it, on the Brown Bear example and on bad
//! input. JSON output is compared with golden files (tests/golden; regenerate with
//! `WEIR_UPDATE_GOLDEN=1 cargo test -p weir-cli`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use weir_policy::matrix::{ExpectedRow, expected_rows};

/// The rows of the Brown Bear example's expected.md.
fn expected(bb: &Path) -> Vec<ExpectedRow> {
    expected_rows(&std::fs::read_to_string(bb.join("expected.md")).expect("expected.md"))
        .expect("expected.md has rows")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn brownbear() -> PathBuf {
    root().join("examples/brownbear")
}

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .env_remove("WEIR_SOCKET")
        .output()
        .expect("running weir")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `weir` and expects success.
fn ok(args: &[&str]) -> String {
    let o = weir(args);
    assert!(o.status.success(), "weir {args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// Runs `weir` and expects a clean failure (exit 1, an `error:` line, no panic).
fn fails(args: &[&str]) -> String {
    let o = weir(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "weir {args:?}: {err}");
    assert!(err.starts_with("error: "), "weir {args:?}: {err}");
    assert!(!err.contains("panicked"), "weir {args:?} panicked: {err}");
    err
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("WEIR_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("writing the golden file");
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (WEIR_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual,
        want,
        "output differs from {}; if the change is intended, regenerate with WEIR_UPDATE_GOLDEN=1",
        path.display()
    );
}

#[test]
fn brownbear_verdicts_equal_expected_md_row_by_row() {
    let bb = brownbear();
    let expected = expected(&bb);
    assert!(expected.len() >= 7, "expected.md has its rows");
    for row in &expected {
        let port = format!("{}/{}", row.port, row.protocol);
        let out = ok(&[
            "explain",
            "--manifests",
            bb.to_str().unwrap(),
            &row.from,
            &row.to,
            &port,
        ]);
        let first = out.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            first,
            if row.allowed { "ALLOW" } else { "DENY" },
            "{} -> {} {port}:\n{out}",
            row.from,
            row.to
        );
    }
}

#[test]
fn the_missing_egress_policy_turns_the_first_row_to_allow() {
    let bb = brownbear();
    let out = ok(&[
        "explain",
        "--manifests",
        bb.to_str().unwrap(),
        "--manifests",
        bb.join("fix/web-egress.yaml").to_str().unwrap(),
        "brownbear-production/web",
        "brownbear-production/api",
        "8080/TCP",
    ]);
    assert!(out.starts_with("ALLOW "), "{out}");
    assert!(
        out.contains("allowed by brownbear-production/web-egress-to-api egress[0]"),
        "{out}"
    );
    assert!(
        out.contains("allowed by brownbear-production/web-to-api ingress[0]"),
        "{out}"
    );
}

#[test]
fn a_denial_names_each_side_and_the_policies() {
    let out = ok(&[
        "explain",
        "--manifests",
        brownbear().to_str().unwrap(),
        "brownbear-production/web",
        "brownbear-production/api",
        "8080/TCP",
    ]);
    let want = [
        "DENY brownbear-production/web -> brownbear-production/api 8080/TCP",
        "source egress of brownbear-production/web: DENY",
        "selected by brownbear-production/default-deny-all",
        "no rule of these policies allows egress to brownbear-production/api on 8080/TCP",
        "destination ingress of brownbear-production/api: ALLOW",
        "allowed by brownbear-production/web-to-api ingress[0]",
    ];
    for w in want {
        assert!(out.contains(w), "missing {w:?} in:\n{out}");
    }
    assert!(
        !out.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
}

#[test]
fn explain_json_is_schema_stable() {
    let bb = brownbear();
    let json = ok(&[
        "-o",
        "json",
        "explain",
        "--manifests",
        bb.to_str().unwrap(),
        "brownbear-production/api",
        "database/mysql",
        "3306/TCP",
    ]);
    golden("explain-api-mysql.json", &json);
    let yaml = ok(&[
        "explain",
        "-o",
        "yaml",
        "--manifests",
        bb.to_str().unwrap(),
        "brownbear-production/web",
        "brownbear-production/api",
        "8080/TCP",
    ]);
    golden("explain-web-api.yaml", &yaml);
}

#[test]
fn matrix_agrees_with_expected_md_and_is_schema_stable() {
    let bb = brownbear();
    let json = ok(&[
        "explain",
        "--manifests",
        bb.to_str().unwrap(),
        "--matrix",
        "--port",
        "3307/TCP",
        "-o",
        "json",
    ]);
    golden("matrix-brownbear.json", &json);
    let m: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let cells = m["cells"].as_array().expect("cells");
    for row in expected(&bb) {
        let cell = cells
            .iter()
            .find(|c| {
                c["from"] == row.from.as_str()
                    && c["to"] == row.to.as_str()
                    && c["port"] == row.port
                    && c["protocol"] == row.protocol.as_str()
            })
            .unwrap_or_else(|| panic!("no cell {} -> {} {}", row.from, row.to, row.port));
        assert_eq!(
            cell["verdict"],
            if row.allowed { "ALLOW" } else { "DENY" },
            "{cell}"
        );
    }
    let table = ok(&["explain", "--manifests", bb.to_str().unwrap(), "--matrix"]);
    assert!(table.starts_with("from \\ to"), "{table}");
    assert!(table.contains("denied:\n"), "{table}");
}

#[test]
fn svg_groups_namespaces_marks_denials_and_names_the_deciding_rule() {
    let bb = brownbear();
    let dir = std::env::temp_dir().join(format!("weir-cli-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("matrix.svg");
    ok(&[
        "explain",
        "--manifests",
        bb.to_str().unwrap(),
        "--matrix",
        "--svg",
        file.to_str().unwrap(),
    ]);
    let svg = std::fs::read_to_string(&file).expect("the SVG was written");
    std::fs::remove_dir_all(&dir).ok();
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    // 4 pods, one declared port each: 4 x 4 cells (the diagonal marked as a pod and itself).
    assert_eq!(svg.matches("<g class=\"cell\">").count(), 16);
    for ns in ["brownbear-production", "database", "kube-system"] {
        assert!(
            svg.contains(&format!(">{ns}</text>")),
            "namespace {ns} labelled"
        );
    }
    assert!(svg.contains(
        "<title>brownbear-production/web -&gt; brownbear-production/api 8080/TCP: DENY\n\
         egress of brownbear-production/web: selected by brownbear-production/default-deny-all; no rule allows it</title>"
    ), "{svg}");
    assert!(svg.contains(
        "<title>brownbear-production/api -&gt; database/mysql 3306/TCP: ALLOW\n\
         egress of brownbear-production/api: allowed by brownbear-production/api-to-database egress[0]; ingress of database/mysql: not isolated</title>"
    ), "{svg}");
    let denied = svg.matches("\u{2715}</text>").count();
    // Every denied cell has the cross, and the legend one more.
    let json = ok(&[
        "explain",
        "--manifests",
        bb.to_str().unwrap(),
        "--matrix",
        "-o",
        "json",
    ]);
    let m: serde_json::Value = serde_json::from_str(&json).unwrap();
    let deny_cells = m["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "DENY")
        .count();
    assert!(deny_cells > 0);
    assert_eq!(denied, deny_cells + 1);
}

#[test]
fn bad_input_gets_errors_that_say_what_to_do() {
    let bb = brownbear();
    let bb = bb.to_str().unwrap();
    let err = fails(&[
        "explain",
        "--manifests",
        bb,
        "brownbear-production/nope",
        "database/mysql",
        "3306/TCP",
    ]);
    assert!(
        err.contains(
            "no pod brownbear-production/nope; known pods in brownbear-production: api, web"
        ),
        "{err}"
    );
    let err = fails(&[
        "explain",
        "--manifests",
        bb,
        "x/a",
        "database/mysql",
        "3306/TCP",
    ]);
    assert!(
        err.contains("no pod x/a; no pods in namespace x; namespaces with pods: brownbear-production, database, kube-system"),
        "{err}"
    );
    let err = fails(&[
        "explain",
        "--manifests",
        bb,
        "mysql",
        "database/mysql",
        "3306/TCP",
    ]);
    assert!(
        err.contains("\"mysql\" is not a pod; write it as namespace/name"),
        "{err}"
    );
    for (port, what) in [
        ("3306", "is not PORT/PROTO; write it like 8080/TCP"),
        ("0/TCP", "is not a number from 1 to 65535"),
        ("70000/TCP", "is not a number from 1 to 65535"),
        ("http/TCP", "is not a number from 1 to 65535"),
        ("53/ICMP", "unknown protocol \"ICMP\"; use TCP, UDP or SCTP"),
    ] {
        let err = fails(&[
            "explain",
            "--manifests",
            bb,
            "database/mysql",
            "kube-system/dns",
            port,
        ]);
        assert!(err.contains(what), "{port}: {err}");
    }
    let err = fails(&[
        "explain",
        "--manifests",
        "/nonexistent/weir",
        "a/b",
        "c/d",
        "80/TCP",
    ]);
    assert!(
        err.contains("reading the manifest /nonexistent/weir"),
        "{err}"
    );
    let err = fails(&["--socket", "/nonexistent/weir.sock", "status"]);
    assert!(
        err.contains("cannot reach the agent at /nonexistent/weir.sock")
            && err.contains("is weir-agent running"),
        "{err}"
    );
}

#[test]
fn a_manifest_that_does_not_parse_is_an_error_not_a_silent_omission() {
    let dir = std::env::temp_dir().join(format!("weir-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: [not, a, map]\n",
    )
    .unwrap();
    let err = fails(&[
        "explain",
        "--manifests",
        dir.to_str().unwrap(),
        "a/b",
        "c/d",
        "80/TCP",
    ]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(err.contains("a.yaml: document 0"), "{err}");
}

#[test]
fn rejected_policies_are_reported() {
    let dir = std::env::temp_dir().join(format!("weir-cli-rej-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(brownbear().join("cluster.yaml"), dir.join("cluster.yaml")).unwrap();
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: bad\n  namespace: database\n\
         spec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: 0\n",
    )
    .unwrap();
    let o = weir(&[
        "explain",
        "--manifests",
        dir.to_str().unwrap(),
        "kube-system/dns",
        "database/mysql",
        "3306/TCP",
    ]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(o.status.success(), "{}", stderr(&o));
    let first = stdout(&o)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(first == "ALLOW" || first == "DENY", "{}", stdout(&o));
    assert!(
        stderr(&o).contains("warning: NetworkPolicy database/bad is rejected")
            && stderr(&o).contains("spec.ingress[0].ports[0]"),
        "{}",
        stderr(&o)
    );
}
