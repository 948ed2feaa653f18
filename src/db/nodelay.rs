//! TCP_NODELAY for the database connections, which sqlx 0.9.0 leaves off: a regression
//! (transact-rs/sqlx#4335, fixed by #4336 after 0.9.0) that makes every statement whose client
//! side is more than one write — a `COPY`'s last `CopyDone` after its data — wait for the
//! server's delayed ACK, ~40 ms each. Measured here: batched COPY of 1,000 events ran at 19,000
//! rows/s through sqlx against 42,000 rows/s through psql on the same table.
//!
//! sqlx does not hand out its socket, so when a connection opens, every TCP socket of this
//! process whose peer port is the database's gets the option (setting it on a socket that has
//! it, or on one to another server on that port, is harmless). Remove once a sqlx release has
//! the fix.

use std::os::fd::BorrowedFd;

/// Sets TCP_NODELAY on every TCP socket of this process connected to `port`.
pub fn set_on_sockets_to(port: u16) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for two system calls. If it was closed (and
        // perhaps reused) meanwhile, they fail or act on another socket of this process, where
        // reading the peer address and setting TCP_NODELAY change nothing harmful.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let to_db = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.port() == port);
        if to_db {
            let _ = sock.set_tcp_nodelay(true);
        }
    }
}
