//! Who holds a lease: the owner token a worker writes on its claims, and
//! whether that worker's process is known to be gone.
//!
//! An engine's owner token is `host:pid-namespace:pid:start-time:worker-id`.
//! The host is the machine's host name and the pid namespace tells apart
//! containers that share it; the start time (clock ticks after boot, from
//! `/proc/<pid>/stat`) tells a process from a later one that reuses its
//! pid. A worker starting on the same host and in the same pid namespace
//! can so see, through `/proc`, that the owner of a lease is dead, and take
//! its claims over at once instead of waiting for the lease to expire.
//! Where `/proc` cannot be read the token is the bare worker id, and such
//! leases are only ever left to expire.

use std::fmt;

/// The owner of a lease, as written in a claim and parsed back from one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOwner {
    /// The worker's configured id ([`crate::EngineConfig::worker_id`]).
    pub worker_id: String,
    /// The process that held the lease, if the token names one.
    pub process: Option<ProcessMark>,
}

/// A process, identified so that it is recognisable across pid reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessMark {
    /// The host name of its machine.
    pub host: String,
    /// The inode of its pid namespace (`/proc/<pid>/ns/pid`).
    pub pid_namespace: u64,
    /// Its process id within that namespace.
    pub pid: u32,
    /// When it started, in clock ticks after boot.
    pub start_time: u64,
}

impl LeaseOwner {
    /// The owner token of a worker `worker_id` running in this process.
    pub fn this_process(worker_id: &str) -> Self {
        LeaseOwner {
            worker_id: worker_id.to_owned(),
            process: ProcessMark::this_process(),
        }
    }

    /// Reads an owner token. One that does not name a process (a bare
    /// worker id, as older versions wrote, or a token from a host without
    /// `/proc`) is all worker id.
    pub fn parse(token: &str) -> Self {
        let mut parts = token.splitn(5, ':');
        let mut next = || parts.next();
        let parsed = (|| {
            let host = next()?;
            let pid_namespace = next()?.parse().ok()?;
            let pid = next()?.parse().ok()?;
            let start_time = next()?.parse().ok()?;
            let worker_id = next()?;
            (!host.is_empty()).then(|| LeaseOwner {
                worker_id: worker_id.to_owned(),
                process: Some(ProcessMark {
                    host: host.to_owned(),
                    pid_namespace,
                    pid,
                    start_time,
                }),
            })
        })();
        parsed.unwrap_or_else(|| LeaseOwner {
            worker_id: token.to_owned(),
            process: None,
        })
    }

    /// Whether this owner's process is known to be gone, as seen from the
    /// process `here`: only for a process on the same host and in the same
    /// pid namespace, whose pid is no longer running or now belongs to a
    /// process started at another time. Anything unknown counts as alive.
    pub fn is_gone(&self, here: Option<&ProcessMark>) -> bool {
        let (Some(owner), Some(here)) = (&self.process, here) else {
            return false;
        };
        if owner.host != here.host || owner.pid_namespace != here.pid_namespace {
            return false;
        }
        match read_proc(&format!("/proc/{}/stat", owner.pid)) {
            // A zombie (`Z`) or dying (`X`) process runs no more work.
            Ok(stat) => parse_stat(&stat).is_some_and(|(state, started)| {
                started != owner.start_time || "ZX".contains(state)
            }),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

impl fmt::Display for LeaseOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.process {
            Some(p) => write!(
                f,
                "{}:{}:{}:{}:{}",
                p.host, p.pid_namespace, p.pid, p.start_time, self.worker_id
            ),
            None => f.write_str(&self.worker_id),
        }
    }
}

impl ProcessMark {
    /// This process, if `/proc` tells its host, pid namespace and start time.
    pub fn this_process() -> Option<Self> {
        let host = read_proc("/proc/sys/kernel/hostname").ok()?;
        let host = host.trim();
        let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
        // The link reads `pid:[4026531836]`.
        let pid_namespace = namespace
            .to_str()?
            .strip_prefix("pid:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        let (_, start_time) = parse_stat(&read_proc("/proc/self/stat").ok()?)?;
        (!host.is_empty() && !host.contains(':')).then(|| ProcessMark {
            host: host.to_owned(),
            pid_namespace,
            pid: std::process::id(),
            start_time,
        })
    }
}

fn read_proc(path: &str) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}

/// The state (field 3) and start time (field 22) of a `/proc/<pid>/stat`
/// line. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 was the first after the name, so field 22 is 19 further on.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here() -> ProcessMark {
        ProcessMark::this_process().expect("the tests run where /proc is readable")
    }

    #[test]
    fn a_token_round_trips_and_a_bare_id_is_all_worker_id() {
        let owner = LeaseOwner::this_process("w:1");
        let token = owner.to_string();
        assert!(token.ends_with(":w:1"), "{token}");
        assert_eq!(LeaseOwner::parse(&token), owner);
        let legacy = LeaseOwner::parse("crash-worker");
        assert_eq!(legacy.worker_id, "crash-worker");
        assert_eq!(legacy.process, None);
        assert_eq!(LeaseOwner::parse("a:b:c:d:e").process, None);
    }

    #[test]
    fn the_start_time_is_read_past_a_name_with_spaces_and_parentheses() {
        let fields: Vec<String> = (4..=22).map(|n| n.to_string()).collect();
        let stat = format!("42 (a (b) c) S {}", fields.join(" "));
        assert_eq!(parse_stat(&stat), Some(('S', 22)));
    }

    #[test]
    fn only_a_dead_process_on_this_host_is_gone() {
        let here = here();
        let me = LeaseOwner::this_process("me");
        assert!(!me.is_gone(Some(&here)), "this process is alive");

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = LeaseOwner {
            worker_id: "other".into(),
            process: Some(ProcessMark {
                pid,
                ..here.clone()
            }),
        };
        assert!(dead.is_gone(Some(&here)), "its pid is no longer running");

        let reused = LeaseOwner {
            worker_id: "other".into(),
            process: Some(ProcessMark {
                start_time: here.start_time + 1,
                ..here.clone()
            }),
        };
        assert!(
            reused.is_gone(Some(&here)),
            "its pid now names another process"
        );

        let elsewhere = LeaseOwner {
            worker_id: "other".into(),
            process: Some(ProcessMark {
                host: format!("{}-elsewhere", here.host),
                pid,
                ..here.clone()
            }),
        };
        assert!(
            !elsewhere.is_gone(Some(&here)),
            "another host is never judged"
        );
        let other_namespace = LeaseOwner {
            worker_id: "other".into(),
            process: Some(ProcessMark {
                pid_namespace: here.pid_namespace + 1,
                pid,
                ..here.clone()
            }),
        };
        assert!(!other_namespace.is_gone(Some(&here)));
        assert!(!dead.is_gone(None), "without /proc nothing is judged");
        assert!(!LeaseOwner::parse("bare").is_gone(Some(&here)));
    }
}
