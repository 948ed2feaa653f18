//! Request ids: UUIDv7 (time-ordered, so a log sorted by id is sorted by arrival) whose 74
//! random bits come from a per-thread generator seeded once from the OS. `Uuid::now_v7` asks
//! the kernel for fresh random bytes on every call (a `getrandom` syscall per request, seen in
//! the ingress's profile); an id needs to be unique, not unpredictable.

use std::cell::Cell;

thread_local! {
    /// xorshift64* state, never zero (seeded from a v4 UUID: one syscall per thread).
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let s = uuid::Uuid::new_v4().as_u64_pair();
    (s.0 ^ s.1.rotate_left(17)) | 1
}

fn next() -> u64 {
    STATE.with(|st| {
        let mut x = st.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        st.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A new request id (UUIDv7 text, 36 characters).
pub fn new() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let (a, b) = (next().to_le_bytes(), next().to_le_bytes());
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&a);
    random[8..].copy_from_slice(&b[..2]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn request_ids_are_v7_unique_and_time_ordered_across_threads() {
        let ids: Vec<String> = (0..4)
            .map(|_| std::thread::spawn(|| (0..20_000).map(|_| super::new()).collect::<Vec<_>>()))
            .flat_map(|t| t.join().unwrap())
            .collect();
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "an id was given twice");
        let first = uuid::Uuid::parse_str(&ids[0]).unwrap();
        assert_eq!(first.get_version_num(), 7);
        assert_eq!(first.get_variant(), uuid::Variant::RFC4122);
        let (a, b) = (super::new(), {
            std::thread::sleep(std::time::Duration::from_millis(2));
            super::new()
        });
        assert!(a < b, "a later id sorts after an earlier one: {a} {b}");
    }
}
