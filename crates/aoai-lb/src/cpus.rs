//! How many CPUs this process may use, which sets how many worker threads
//! serve the public listener (see [`crate::server`]).
//!
//! Two limits apply and the smaller wins:
//! - the scheduler affinity mask (`taskset`, `cpuset` cgroups, Kubernetes
//!   static CPU manager): the CPUs the threads may run on at all, read from
//!   `Cpus_allowed_list` in `/proc/self/status`;
//! - the cgroup v2 CPU quota (`cpu.max`, what Azure Container Apps and
//!   Kubernetes CPU limits set): the CPU time the process gets per period.
//!   A fractional quota is rounded **up** (1.5 CPUs gives 2 workers): the
//!   workers are idle most of the time on a quota that small, and rounding
//!   down would leave the last half CPU unused.
//!
//! The standard library's `available_parallelism` combines both too, but
//! rounds the quota down, which on a 0.5-CPU container and a 1.5-CPU one
//! alike gives one worker; it is only the fallback when `/proc` cannot be
//! read. Everything here is a pure function of file contents, so it is
//! tested without a container.

use std::path::Path;

/// The number of CPUs the process may use: the affinity mask bounded by the
/// cgroup v2 quota (rounded up), at least 1. Falls back to
/// `std::thread::available_parallelism` (and then to 1) when the affinity
/// mask cannot be read.
pub fn usable() -> usize {
    let affinity = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| affinity_from_status(&s))
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let quota = cgroup_quota(Path::new("/sys/fs/cgroup"), &read("/proc/self/cgroup"));
    combine(affinity, quota)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The affinity count bounded by the quota, at least 1.
fn combine(affinity: usize, quota: Option<usize>) -> usize {
    quota.map_or(affinity, |q| affinity.min(q)).max(1)
}

/// Counts the CPUs in the `Cpus_allowed_list:` line of `/proc/PID/status`
/// (`0-3,8,10-11`). `None` when the line is missing or malformed.
fn affinity_from_status(status: &str) -> Option<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim();
    let mut n = 0usize;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.trim().parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// Parses a `cpu.max` file (`"200000 100000"`, or `"max 100000"` for no
/// limit) into whole CPUs, rounded up. `None` for no limit or a malformed
/// file.
fn quota_from_cpu_max(cpu_max: &str) -> Option<usize> {
    let mut it = cpu_max.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if period == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period).max(1)).ok()
}

/// The tightest `cpu.max` quota on the way from the process's own cgroup
/// (from `/proc/self/cgroup`, the `0::/path` line of cgroup v2) up to the
/// root of the cgroup mount. In a container the mount's root is the
/// container's own cgroup, whose `cpu.max` holds the quota.
fn cgroup_quota(mount: &Path, proc_self_cgroup: &str) -> Option<usize> {
    let own = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/'))
        .unwrap_or("");
    let mut dir = mount.join(own);
    let mut tightest: Option<usize> = None;
    loop {
        // A path outside the mount (cgroup namespaces show `/..` paths on
        // some set-ups) ends the walk at the mount itself.
        if dir.starts_with(mount)
            && let Some(q) = std::fs::read_to_string(dir.join("cpu.max"))
                .ok()
                .and_then(|s| quota_from_cpu_max(&s))
        {
            tightest = Some(tightest.map_or(q, |t| t.min(q)));
        }
        if dir.as_path() == mount || !dir.pop() || !dir.starts_with(mount) {
            break;
        }
    }
    tightest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpus_in_the_affinity_list() {
        let status = "Name:\taoai-lb\nCpus_allowed:\tf\nCpus_allowed_list:\t0-3,8,10-11\n";
        assert_eq!(affinity_from_status(status), Some(7));
        assert_eq!(
            affinity_from_status("Cpus_allowed_list:\t1\n"),
            Some(1),
            "taskset -c 1"
        );
        assert_eq!(affinity_from_status("Cpus_allowed_list:\t3-1\n"), None);
        assert_eq!(affinity_from_status("Name: x\n"), None);
    }

    #[test]
    fn rounds_a_fractional_quota_up() {
        assert_eq!(quota_from_cpu_max("max 100000\n"), None);
        assert_eq!(quota_from_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(quota_from_cpu_max("150000 100000\n"), Some(2));
        assert_eq!(quota_from_cpu_max("50000 100000\n"), Some(1));
        assert_eq!(quota_from_cpu_max("25000 100000\n"), Some(1));
        assert_eq!(quota_from_cpu_max("garbage"), None);
        assert_eq!(quota_from_cpu_max("100000 0"), None);
    }

    #[test]
    fn takes_the_smaller_of_affinity_and_quota_and_never_zero() {
        assert_eq!(combine(8, Some(2)), 2);
        assert_eq!(combine(2, Some(4)), 2);
        assert_eq!(combine(2, None), 2);
        assert_eq!(combine(0, None), 1);
    }

    #[test]
    fn reads_the_tightest_quota_from_the_own_cgroup_up_to_the_mount() {
        let root = std::env::temp_dir().join(format!("aoai-lb-cpus-{}", std::process::id()));
        let leaf = root.join("app.slice/web.service");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("cpu.max"), "max 100000\n").unwrap();
        std::fs::write(root.join("app.slice/cpu.max"), "300000 100000\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "150000 100000\n").unwrap();
        assert_eq!(
            cgroup_quota(&root, "0::/app.slice/web.service\n"),
            Some(2),
            "1.5 CPUs on the service, 3 on the slice"
        );
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, "0::/app.slice/web.service\n"), Some(3));
        // Container: the process sits at the root of its namespace.
        std::fs::write(root.join("cpu.max"), "100000 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, "0::/\n"), Some(1));
        // cgroup v1 only, or no cgroup file: the mount's own file counts.
        assert_eq!(cgroup_quota(&root, ""), Some(1));
        assert_eq!(cgroup_quota(&root.join("absent"), "0::/\n"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn this_process_may_use_at_least_one_cpu() {
        assert!(usable() >= 1);
    }
}
