//! The shipped Kubernetes manifest: every path its configuration names is on a volume of the
//! DaemonSet (mounted from the node where it must outlive the pod), the daemon runs in the
//! host's cgroup namespace, its probes ask for the health, and its configuration and policies
//! run a daemon that enforces.

use std::{collections::BTreeMap, path::Path};

use agentwall_tests::{TestDaemon, lines, serial};
use serde_norway::Value;

#[allow(
    clippy::unwrap_used,
    reason = "a test helper: failing here fails the test"
)]
fn manifest() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/agentwall.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
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
fn the_kubernetes_manifest_wires_every_path_and_its_configuration_enforces() {
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
    for probe in ["readinessProbe", "livenessProbe"] {
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
