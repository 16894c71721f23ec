//! Plain-old-data types shared by the kernel programs (agent-ebpf) and the userspace agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (map keys are compared byte by
//! byte, so padding would make equal keys differ), and keeps addresses as IPv6 words in
//! network byte order: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so that one key type
//! serves both the connect4 and the connect6 hooks.
#![no_std]
#![deny(unsafe_code)]

/// Length of a task's `comm`, as the kernel defines it (including the NUL).
pub const TASK_COMM_LEN: usize = 16;

/// Map and program names, used by both sides so a rename cannot split them.
pub mod names {
    pub const TARGETS: &str = "TARGETS";
    pub const CONFIG: &str = "CONFIG";
    pub const ORIGIN_COOKIE: &str = "ORIGIN_COOKIE";
    pub const ORIGIN_PEER: &str = "ORIGIN_PEER";
    pub const COUNTERS: &str = "COUNTERS";
    pub const PROG_CONNECT4: &str = "mcptrail_connect4";
    pub const PROG_CONNECT6: &str = "mcptrail_connect6";
    pub const PROG_GETPEERNAME4: &str = "mcptrail_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "mcptrail_getpeername6";
    pub const PROG_SOCKOPS: &str = "mcptrail_sockops";
}

/// Sizes of the kernel maps. The origin maps are LRU: a client that never completes its
/// handshake must not pin an entry forever. Userspace may resize the origin maps at load time.
pub const TARGETS_MAX: u32 = 1024;
pub const ORIGIN_MAX: u32 = 65_536;

/// The IPv6 loopback address `::1` as network-order words.
pub const LOOPBACK6: Addr6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// True for `::ffff:a.b.c.d`.
pub const fn is_v4_mapped(addr: &Addr6) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Connections rewritten to the proxy.
    pub const REDIRECTED: u32 = 0;
    /// The caller was the agent itself (loop guard: tgid).
    pub const SKIPPED_SELF: u32 = 1;
    /// The socket carried the agent's SO_MARK (loop guard: mark).
    pub const SKIPPED_MARK: u32 = 2;
    /// The destination already was the proxy (loop guard: destination).
    pub const SKIPPED_PROXY_DST: u32 = 3;
    /// The caller was in another network namespace than the proxy.
    pub const SKIPPED_OTHER_NETNS: u32 = 4;
    /// An IPv6 target was hit but the proxy has no IPv6 listener.
    pub const SKIPPED_NO_V6_PROXY: u32 = 5;
    /// The origin record could not be stored at connect time.
    pub const ORIGIN_INSERT_FAILED: u32 = 6;
    /// sockops found the origin of an established redirected connection.
    pub const ESTABLISHED: u32 = 7;
    /// A connection reached the proxy but its origin had been evicted from the LRU map.
    pub const ORIGIN_EVICTED: u32 = 8;
    /// sockops could not store the origin under the client's address.
    pub const PEER_INSERT_FAILED: u32 = 9;
    /// The connect hook ran without its configuration (agent not initialised).
    pub const NO_CONFIG: u32 = 10;
    /// getpeername() answered with the original destination instead of the proxy.
    pub const PEERNAME_REWRITTEN: u32 = 11;
    pub const LEN: u32 = 12;
    pub const NAMES: [&str; LEN as usize] = [
        "redirected",
        "skipped_self",
        "skipped_mark",
        "skipped_proxy_dst",
        "skipped_other_netns",
        "skipped_no_v6_proxy",
        "origin_insert_failed",
        "established",
        "origin_evicted",
        "peer_insert_failed",
        "no_config",
        "peername_rewritten",
    ];
}

/// An IPv6 address as four words, each holding four bytes in network order.
pub type Addr6 = [u32; 4];

/// The IPv4-mapped form of an IPv4 address given as its raw network-order word (as the kernel
/// hands it over in `bpf_sock_addr.user_ip4`).
pub const fn v4_mapped(ip4_raw: u32) -> Addr6 {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_raw]
}

/// A redirect target. `addr` all zero means any address (`*:PORT`). `port` is in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetKey {
    pub addr: Addr6,
    pub port: u32,
}

/// `Config::flags`: userspace has filled the struct in.
pub const CONFIG_READY: u32 = 1;
/// `Config::flags`: the proxy also listens on `[::1]`, so IPv6 destinations can be redirected.
pub const CONFIG_PROXY_V6: u32 = 2;

/// Agent settings the kernel programs need. Lives in a one-slot array so that it can be
/// changed while the programs run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Process id (tgid) of the agent: its own connections are never redirected.
    pub agent_tgid: u32,
    /// Port of the proxy listeners, host order.
    pub proxy_port: u32,
    /// IPv4 address of the proxy listener, raw network-order word.
    pub proxy_ip4: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    /// Network namespace the proxy listens in; callers elsewhere are left alone.
    pub netns_cookie: u64,
    /// SO_MARK the agent puts on its upstream sockets; 0 turns that guard off.
    pub mark: u32,
    /// Always zero; spelled out so the struct has no padding.
    pub pad: u32,
}

/// Who connected where, captured in the caller's context by the connect hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// Destination the caller asked for.
    pub dst_addr: Addr6,
    /// Its port, host order.
    pub dst_port: u32,
    pub tgid: u32,
    /// Thread that called connect().
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Index of the target entry that matched.
    pub target_id: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// `bpf_ktime_get_ns` at connect time (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    pub comm: [u8; TASK_COMM_LEN],
}

/// The client side of a redirected connection as the proxy's accept() sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    pub addr: Addr6,
    /// Client port, host order.
    pub port: u32,
    /// Always zero; spelled out so the key has no padding.
    pub pad: u32,
    pub netns_cookie: u64,
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: all four are repr(C), Copy, and made only of integers with no padding, so any
    // byte pattern is a valid value.
    unsafe impl aya::Pod for super::TargetKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::PeerKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<TargetKey>(), 20);
        assert_eq!(core::mem::size_of::<Config>(), 32);
        assert_eq!(core::mem::size_of::<Origin>(), 80);
        assert_eq!(core::mem::size_of::<PeerKey>(), 32);
    }

    #[test]
    fn v4_mapped_matches_the_ipv6_spelling() {
        let raw = u32::from_ne_bytes([127, 0, 0, 1]);
        let words = v4_mapped(raw);
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
    }
}
