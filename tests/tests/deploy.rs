//! The Helm chart (deploy/helm/agentwall), rendered by Helm: every path its configuration names
//! is on a volume of the DaemonSet (mounted from the node where it must outlive the pod), the
//! daemon runs in the host's cgroup namespace, its probes ask for the health, its configuration
//! and policies run a daemon that enforces, a change of them rolls the pods, and the rendered
//! objects pass the Kubernetes schemas and a security scanner, each exception written down.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use agentwall_tests::{TestDaemon, lines, serial};
use serde_norway::Value;

/// A digest to render with: production installs pin the image by one.
const DIGEST: &str = "sha256:4f1c0a7d2b9e8c6f5a3d1e0b9c8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a";

/// Helm, kubernetes-validate and checkov (`cargo xtask test` installs them).
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("AGENTWALL_KUBERNETES_TOOLS").map_or_else(
        || PathBuf::from("/opt/agentwall-tests/kubernetes/bin"),
        PathBuf::from,
    );
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: `cargo xtask test` installs it",
        p.display()
    );
    p
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/agentwall")
}

/// `helm template` of the chart with `sets` (`key=value`), as text.
#[allow(
    clippy::unwrap_used,
    reason = "a test helper: failing here fails the test"
)]
fn render(sets: &[&str]) -> String {
    let mut c = Command::new(tool("helm"));
    c.args(["template", "agentwall", "--namespace", "agentwall"])
        .arg(chart());
    c.args(["--set", &format!("image.digest={DIGEST}")]);
    for s in sets {
        c.args(["--set", s]);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "helm template: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[allow(
    clippy::unwrap_used,
    reason = "a test helper: failing here fails the test"
)]
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn manifest() -> Vec<Value> {
    documents(&render(&[]))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifest"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn the_chart_wires_every_path_and_its_configuration_enforces() {
    let _s = serial();
    let docs = manifest();
    let config_text = find(&docs, "ConfigMap", "agentwall-config")["data"]["agentwall.yaml"]
        .as_str()
        .expect("agentwall.yaml in the config map");
    let config: Value = serde_norway::from_str(config_text).unwrap();
    let policies: Vec<(String, String)> = find(&docs, "ConfigMap", "agentwall-policies")["data"]
        .as_mapping()
        .expect("policy files")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str().unwrap().to_string(),
            )
        })
        .collect();

    let pod = &find(&docs, "DaemonSet", "agentwall")["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true));
    // Pulled by digest, no service-account token, a read-only root.
    assert_eq!(
        c["image"].as_str(),
        Some(format!("agentwall@{DIGEST}").as_str())
    );
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    // Volume name -> (mount path, what it mounts).
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let mounts: BTreeMap<&str, (&str, &Value)> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            let name = m["name"].as_str().unwrap();
            (m["mountPath"].as_str().unwrap(), (name, m))
        })
        .collect();
    let volume_at = |path: &str| -> &Value {
        let (_, (name, _)) = mounts
            .iter()
            .filter(|(at, _)| path == **at || path.starts_with(&format!("{at}/")))
            .max_by_key(|(at, _)| at.len())
            .unwrap_or_else(|| panic!("{path} is on no volume of the DaemonSet"));
        volumes[name]
    };
    let host_path = |path: &str| volume_at(path)["hostPath"]["path"].as_str();
    let config_map = |path: &str| volume_at(path)["configMap"]["name"].as_str();

    // The daemon runs in the host's cgroup namespace, on the configuration of the config map.
    let command = strings(&c["command"]);
    assert_eq!(
        command[..6],
        ["nsenter", "--target", "1", "--cgroup", "--", "agentwall"]
    );
    assert_eq!(command[6..8], ["run", "--config"]);
    let config_file = command[8];
    assert_eq!(config_map(config_file), Some("agentwall-config"));
    assert!(config_file.ends_with("/agentwall.yaml"), "{config_file}");
    assert_eq!(
        config_map(config["policy_dir"].as_str().unwrap()),
        Some("agentwall-policies")
    );
    // What must outlive the pod is on the node.
    let s = |v: &Value| v.as_str().unwrap().to_string();
    for (what, path, node) in [
        ("state", s(&config["state_dir"]), "/var/lib/agentwall"),
        ("pins", s(&config["pin_dir"]), "/sys/fs/bpf"),
        ("admin socket", s(&config["socket"]), "/run/agentwall"),
        (
            "enrollment socket",
            s(&config["enrollment"]["socket"]),
            "/run/agentwall",
        ),
        (
            "agent files",
            s(&config["identity"]["agent_dir"]),
            "/run/agentwall",
        ),
        (
            "audit key",
            s(&config["audit"]["key_file"]),
            "/etc/agentwall/keys",
        ),
    ] {
        assert_eq!(host_path(&path), Some(node), "{what} at {path}");
    }
    assert_eq!(host_path("/sys/fs/cgroup"), Some("/sys/fs/cgroup"));
    let (_, (_, bpffs)) = mounts.iter().find(|(at, _)| **at == "/sys/fs/bpf").unwrap();
    assert_eq!(bpffs["mountPropagation"].as_str(), Some("Bidirectional"));
    // The audit key is not beside the log.
    assert_ne!(
        host_path(&s(&config["audit"]["key_file"])),
        host_path(&s(&config["state_dir"]))
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            strings(&c[probe]["exec"]["command"]),
            [
                "agentwall",
                "status",
                "--check",
                "--socket",
                config["socket"].as_str().unwrap()
            ],
            "{probe}"
        );
    }

    // The configuration and the policies, run here: the paths on the node's volumes become
    // this test's own (the harness passes them as flags), and metrics listen on loopback.
    let here = config_text.replace("listen: 0.0.0.0:9469", "listen: 127.0.0.1:0");
    assert_ne!(here, config_text, "the metrics address moved");
    let files: Vec<(&str, &str)> = policies
        .iter()
        .map(|(f, t)| (f.as_str(), t.as_str()))
        .collect();
    let d = TestDaemon::start_with_config(&files, Some(&here));
    let status = d.status();
    let mut names: Vec<&str> = status.policies.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["sealed", "web-fetcher"]);
    let o = d.cli(&["status", "--check"]);
    assert!(o.status.success(), "{o:?}");
    let sink = agentwall_tests::TcpSink::new("127.0.0.1:0");
    let o = d.exec("sealed", None, &[&format!("tcp 127.0.0.1:{}", sink.port())]);
    assert_eq!(lines(&o), ["err EPERM"], "{o:?}");
    assert_eq!(sink.accepted(), 0);
}

/// The pod template's annotation `name` of a rendering.
fn pod_annotation(docs: &[Value], name: &str) -> String {
    find(docs, "DaemonSet", "agentwall")["spec"]["template"]["metadata"]["annotations"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} annotation"))
        .to_string()
}

#[test]
#[allow(clippy::unwrap_used, reason = "a test: failing here fails the test")]
fn a_configuration_change_rolls_the_pods_a_policy_change_does_not_and_secrets_are_wired() {
    let base = manifest();
    // Policies: the daemon reloads the mounted directory itself (and refuses a bad one
    // without restarting), so the pod template stays as it is.
    let changed = documents(&render(&["policies.extra\\.yaml=policy:\n  name: extra\n"]));
    assert_eq!(
        find(&base, "DaemonSet", "agentwall")["spec"]["template"],
        find(&changed, "DaemonSet", "agentwall")["spec"]["template"],
    );
    assert!(find(&changed, "ConfigMap", "agentwall-policies")["data"]["extra.yaml"].is_string());
    // The configuration and the trust bundles are read at start: a change rolls the pods.
    let config = documents(&render(&["config.identity.svid_lifetime=30m"]));
    assert_ne!(
        pod_annotation(&base, "checksum/config"),
        pod_annotation(&config, "checksum/config")
    );
    let bundles = documents(&render(&["trustBundles.example\\.org=PEM"]));
    assert_ne!(
        pod_annotation(&base, "checksum/bundles"),
        pod_annotation(&bundles, "checksum/bundles")
    );
    // A trust bundle becomes a file and identity.bundles; the audit key can be a Secret.
    let docs = documents(&render(&[
        "trustBundles.example\\.org=PEM",
        "auditKey.existingSecret=agentwall-audit-key",
    ]));
    let text = find(&docs, "ConfigMap", "agentwall-config")["data"]["agentwall.yaml"]
        .as_str()
        .unwrap();
    let config: Value = serde_norway::from_str(text).unwrap();
    assert_eq!(
        config["identity"]["bundles"][0]["file"].as_str(),
        Some("/etc/agentwall/bundles/example.org.pem")
    );
    assert!(find(&docs, "ConfigMap", "agentwall-bundles")["data"]["example.org.pem"].is_string());
    let pod = &find(&docs, "DaemonSet", "agentwall")["spec"]["template"]["spec"];
    let keys = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some("keys"))
        .unwrap();
    assert_eq!(
        keys["secret"]["secretName"].as_str(),
        Some("agentwall-audit-key")
    );
}

#[test]
#[allow(clippy::unwrap_used, reason = "a test: failing here fails the test")]
fn the_rendered_chart_passes_the_schemas_and_the_scanner_with_every_exception_explained() {
    let dir = std::env::temp_dir().join(format!("awt-{}-chart", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, render(&[])).unwrap();
    let out = Command::new(tool("kubernetes-validate"))
        .arg("--strict")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "kubernetes-validate: {out:?}");
    // checkov, offline: its guidelines from the network are not needed for the checks.
    let out = Command::new(tool("checkov"))
        .args(["--framework", "kubernetes", "--output", "json", "-f"])
        .arg(&file)
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("checkov's report ({e}): {out:?}"));
    let summary = &report["summary"];
    assert_eq!(summary["failed"], 0, "checkov: {report:#}");
    assert!(summary["passed"].as_u64().unwrap() > 50, "{summary}");
    // Every check skipped is skipped with its reason.
    let skipped = report["results"]["skipped_checks"].as_array().unwrap();
    assert!(!skipped.is_empty());
    for check in skipped {
        let why = check["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or("");
        assert!(
            why.len() > 20,
            "{} skipped without a reason",
            check["check_id"]
        );
    }
}
