//! The default transactional id of an exactly-once processor: `helios-<group>-<host>-<slot>`,
//! where the slot is the lowest one no other running instance on this host holds (an advisory
//! lock on a file per slot, released by the kernel when the process ends, however it ends).
//! So two instances on one host never share an id (one would fence the other at every
//! transaction), while an instance restarted after a crash takes its predecessor's slot, and its
//! `init_transactions` fences the predecessor and aborts its open transaction at once instead of
//! leaving it to `transaction.timeout.ms`.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

/// A claimed slot: the id, and the lock that holds it (keep it for the life of the process).
pub struct TransactionalSlot {
    pub id: String,
    pub slot: u32,
    _lock: File,
}

/// Where the slot locks live: `HELIOS_STATE_DIR`, else `<temp dir>/helios`.
fn lock_dir() -> PathBuf {
    std::env::var_os("HELIOS_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("helios"))
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// Takes the lowest free slot for `group` on this host.
pub fn claim(group: &str) -> anyhow::Result<TransactionalSlot> {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).map_err(|e| {
        anyhow::anyhow!(
            "exactly-once: cannot create {} for the transactional-id locks (set HELIOS_STATE_DIR or HELIOS_TRANSACTIONAL_ID): {e}",
            dir.display()
        )
    })?;
    let safe: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let host = host_name();
    for slot in 0..4096u32 {
        let path = dir.join(format!("txn-{safe}-{slot}.lock"));
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("exactly-once: cannot open {}: {e}", path.display()))?;
        if try_lock(&f) {
            return Ok(TransactionalSlot {
                id: format!("helios-{group}-{host}-{slot}"),
                slot,
                _lock: f,
            });
        }
    }
    anyhow::bail!(
        "exactly-once: no free transactional-id slot in {}",
        dir.display()
    )
}

#[cfg(unix)]
fn try_lock(f: &File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor this function's caller owns; no memory is involved.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
fn try_lock(_: &File) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_on_one_host_get_different_ids_and_a_freed_slot_is_taken_again() {
        let group = format!("g-{}", uuid::Uuid::new_v4().simple());
        let a = claim(&group).unwrap();
        let b = claim(&group).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!((a.slot, b.slot), (0, 1));
        let a_id = a.id.clone();
        drop(a); // the instance holding slot 0 ends
        let c = claim(&group).unwrap();
        assert_eq!(c.id, a_id, "a restart takes its predecessor's id");
    }
}
