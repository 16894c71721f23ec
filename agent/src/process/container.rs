//! What a cgroup v2 path says about where a process runs: its systemd unit, and the
//! container (docker, containerd, CRI-O, podman) and Kubernetes pod it belongs to. Pure.
#![forbid(unsafe_code)]

use crate::audit::record::Container;

/// The unit and the container a cgroup path names.
pub fn classify(path: &str) -> (Option<String>, Option<Container>) {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let unit = parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
        .map(|p| (*p).to_owned());
    let pod_uid = parts.iter().find_map(|p| pod_uid(p));
    let container = parts
        .iter()
        .rev()
        .find_map(|p| container_of(p))
        .map(|(runtime, id)| Container {
            runtime: runtime.to_owned(),
            id,
            pod_uid: pod_uid.clone(),
        });
    (unit, container)
}

/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`
/// (systemd driver), or a bare 64-hex id under `docker/`, `kubepods/…` (cgroupfs driver).
fn container_of(part: &str) -> Option<(&'static str, String)> {
    const PREFIXES: [(&str, &str); 4] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
    ];
    let stem = part.strip_suffix(".scope").unwrap_or(part);
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Some((runtime, id.to_owned()));
        }
    }
    // cgroupfs driver: the folder is the bare id; the runtime is not named, docker's own
    // layout (`/docker/<id>`) is the common case.
    is_container_id(part).then(|| ("docker", part.to_owned()))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `kubepods-burstable-pod<uid with _>.slice` (systemd driver) or `pod<uid>` (cgroupfs).
fn pod_uid(part: &str) -> Option<String> {
    let stem = part.strip_suffix(".slice").unwrap_or(part);
    let at = stem.rfind("pod")?;
    if !stem[..at].is_empty() && !stem[..at].ends_with('-') {
        return None;
    }
    let uid = stem[at + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        });
    ok.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";

    #[test]
    fn systemd_units() {
        assert_eq!(
            classify("/system.slice/gitlab-runner.service"),
            (Some("gitlab-runner.service".into()), None)
        );
        assert_eq!(
            classify("/user.slice/user-1000.slice/session-3.scope")
                .0
                .as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(classify("/"), (None, None));
        assert_eq!(classify("/mcptrail-test-1-x"), (None, None));
    }

    #[test]
    fn docker_both_drivers() {
        let (unit, c) = classify(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(unit, Some(format!("docker-{ID}.scope")));
        let c = c.unwrap();
        assert_eq!(
            (c.runtime.as_str(), c.id.as_str(), c.pod_uid),
            ("docker", ID, None)
        );
        assert_eq!(classify(&format!("/docker/{ID}")).1.unwrap().id, ID);
    }

    #[test]
    fn podman_and_crio() {
        assert_eq!(
            classify(&format!("/machine.slice/libpod-{ID}.scope/container"))
                .1
                .unwrap()
                .runtime,
            "podman"
        );
        assert_eq!(
            classify(&format!("/crio-{ID}.scope")).1.unwrap().runtime,
            "cri-o"
        );
    }

    #[test]
    fn kubernetes_pods() {
        let uid = "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9";
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid.replace('-', "_")
        );
        let c = classify(&systemd).1.unwrap();
        assert_eq!(
            (c.runtime.as_str(), c.pod_uid.as_deref()),
            ("containerd", Some(uid))
        );
        let cgroupfs = format!("/kubepods/burstable/pod{uid}/{ID}");
        assert_eq!(classify(&cgroupfs).1.unwrap().pod_uid.as_deref(), Some(uid));
    }

    #[test]
    fn near_misses_are_not_containers() {
        assert_eq!(classify("/system.slice/docker-abc.scope").1, None);
        assert_eq!(classify("/system.slice/docker.service").1, None);
        assert_eq!(classify("/ipod1234").1, None);
    }
}
