//! This process as others see it: `hostname:pid` in queue leases, task results, the scheduler
//! lease and job runs; and whether such an owner is a process of this host that has died.

/// This process, as recorded in task results, leases and job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub hostname: String,
    pub pid: u32,
}

impl Identity {
    pub fn current() -> Identity {
        let hostname = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        Identity {
            hostname,
            pid: std::process::id(),
        }
    }

    /// `hostname:pid`, as leases and job runs record their owner.
    pub fn holder(&self) -> String {
        format!("{}:{}", self.hostname, self.pid)
    }

    /// Whether `owner` (a `hostname:pid`, possibly followed by `/` and what tells apart the
    /// claims of one process) is a process of this host, other than this one, that no longer
    /// exists. An owner on another host, or a live process, is not known to be dead.
    pub fn is_dead_owner(&self, owner: &str) -> bool {
        let owner = owner.split_once('/').map_or(owner, |(process, _)| process);
        let Some((host, pid)) = owner.rsplit_once(':') else {
            return false;
        };
        if host != self.hostname {
            return false;
        }
        let Ok(pid) = pid.parse::<i32>() else {
            return false;
        };
        if pid as u32 == self.pid {
            return false;
        }
        rustix::process::Pid::from_raw(pid).is_some_and(|pid| {
            matches!(
                rustix::process::test_kill_process(pid),
                Err(rustix::io::Errno::SRCH)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gone_processes_of_this_host_are_dead() {
        let me = Identity::current();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        assert!(me.is_dead_owner(&format!("{}:{gone}", me.hostname)));
        assert!(me.is_dead_owner(&format!("{}:{gone}/slot-claim", me.hostname)));
        assert!(!me.is_dead_owner(&format!("{}/slot-claim", me.holder())));
        assert!(!me.is_dead_owner(&me.holder()), "this process");
        assert!(
            !me.is_dead_owner(&format!("{}:1", me.hostname)),
            "a live process"
        );
        assert!(
            !me.is_dead_owner(&format!("elsewhere.example:{gone}")),
            "another host"
        );
        assert!(!me.is_dead_owner("garbage"));
    }
}
