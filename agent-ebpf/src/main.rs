//! mcptrail's kernel side.
//!
//! `mcptrail_connect4` runs in the caller's context on every IPv4 connect() in the attached
//! cgroup. When the destination is a configured MCP gateway it records who is calling and where
//! they meant to go (keyed by the socket cookie), then rewrites the destination to the local
//! proxy. `mcptrail_sockops` runs when that connection is established and re-keys the record by
//! the client's own address and port, which is all the proxy's accept() gets to see.
//!
//! Both programs always let the connect() proceed: a failure here must never break a client,
//! it only shows up in the counters.
#![no_std]
#![no_main]

use agent_common::{
    Config, ORIGIN_MAX, Origin, PeerKey, TARGETS_MAX, TASK_COMM_LEN, TargetKey, counter, v4_mapped,
};
use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Return value of a cgroup sock_addr program that lets the syscall go on.
const ALLOW: i32 = 1;

#[map(name = "TARGETS")]
static TARGETS: HashMap<TargetKey, u32> = HashMap::with_max_entries(TARGETS_MAX, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "ORIGIN_COOKIE")]
static ORIGIN_COOKIE: LruHashMap<u64, Origin> = LruHashMap::with_max_entries(ORIGIN_MAX, 0);

#[map(name = "ORIGIN_PEER")]
static ORIGIN_PEER: LruHashMap<PeerKey, Origin> = LruHashMap::with_max_entries(ORIGIN_MAX, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and BPF programs are not preempted on their CPU while they run.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn lookup_target(addr: [u32; 4], port: u32) -> Option<u32> {
    // SAFETY: the value is copied out at once; a concurrent update can at worst hand back an
    // id that is being replaced, which only affects the id in the record.
    unsafe {
        if let Some(id) = TARGETS.get(TargetKey { addr, port }) {
            return Some(*id);
        }
        TARGETS.get(TargetKey { addr: [0; 4], port }).copied()
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mcptrail_connect4(ctx: SockAddrContext) -> i32 {
    connect4(&ctx);
    ALLOW
}

#[inline(always)]
fn connect4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid bpf_sock_addr for its whole run.
    let (sock_type, protocol, ip4, user_port) =
        unsafe { ((*sa).type_, (*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return;
    }
    let port = u32::from(u16::from_be(user_port as u16));
    let dst = v4_mapped(ip4);
    let Some(target_id) = lookup_target(dst, port) else {
        return;
    };
    let Some(cfg) = CONFIG.get(0) else {
        count(counter::NO_CONFIG);
        return;
    };
    if cfg.ready == 0 {
        count(counter::NO_CONFIG);
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.agent_tgid {
        count(counter::SKIPPED_SELF);
        return;
    }
    if port == cfg.proxy_port && ip4 == cfg.proxy_ip4 {
        count(counter::SKIPPED_PROXY_DST);
        return;
    }
    // SAFETY: both helpers only read from the context pointer the kernel gave us.
    let (netns_cookie, cookie) = unsafe {
        (
            bpf_get_netns_cookie(sa.cast()),
            bpf_get_socket_cookie(sa.cast()),
        )
    };
    if netns_cookie != cfg.netns_cookie {
        count(counter::SKIPPED_OTHER_NETNS);
        return;
    }
    let uid_gid = bpf_get_current_uid_gid();
    let origin = Origin {
        dst_addr: dst,
        dst_port: port,
        tgid,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        target_id,
        // SAFETY: argument-free helpers.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]),
    };
    // Redirect even if the record cannot be stored: the proxy then refuses the connection and
    // records the refusal, which is visible, whereas letting it through would be unaudited.
    if ORIGIN_COOKIE.insert(cookie, origin, 0).is_err() {
        count(counter::ORIGIN_INSERT_FAILED);
    }
    // SAFETY: connect4 programs may rewrite user_ip4 and user_port (as full 32-bit stores).
    unsafe {
        (*sa).user_ip4 = cfg.proxy_ip4;
        (*sa).user_port = u32::from((cfg.proxy_port as u16).to_be());
    }
    count(counter::REDIRECTED);
}

#[sock_ops]
pub fn mcptrail_sockops(ctx: SockOpsContext) -> u32 {
    sockops(&ctx);
    1
}

#[inline(always)]
fn sockops(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return;
    }
    // SAFETY: reads from the context the kernel gave us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once; LRU eviction of this entry between lookup and copy is the
    // only hazard and it just means a miss that the proxy reports.
    let Some(origin) = (unsafe { ORIGIN_COOKIE.get(cookie) }).copied() else {
        return;
    };
    // Only connect4 redirects so far, and it only sees AF_INET sockets. (Reading local_ip4 or
    // local_ip6 by family in one expression lets LLVM fold both into one load at a computed
    // context offset, which the verifier rejects; the IPv6 path needs its own constant loads.)
    if ctx.family() != AF_INET {
        return;
    }
    let key = PeerKey {
        addr: v4_mapped(ctx.local_ip4()),
        port: ctx.local_port(),
        pad: 0,
        // SAFETY: reads from the context the kernel gave us.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
    };
    if ORIGIN_PEER.insert(key, origin, 0).is_err() {
        count(counter::PEER_INSERT_FAILED);
    } else {
        count(counter::ESTABLISHED);
    }
    let _ = ORIGIN_COOKIE.remove(cookie);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
