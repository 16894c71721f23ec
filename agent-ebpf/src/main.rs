//! mcptrail's kernel side.
//!
//! `mcptrail_connect4`/`mcptrail_connect6` run in the caller's context on every connect() in
//! the attached cgroup. When the destination is a configured MCP gateway they record who is
//! calling and where they meant to go (keyed by the socket cookie), then rewrite the
//! destination to the local proxy. `mcptrail_sockops` runs when that connection is established
//! and copies the record under the client's own address and port, which is all the proxy's
//! accept() gets to see; it removes the cookie entry when the socket closes.
//! `mcptrail_getpeername4/6` make getpeername() on a redirected socket answer with the
//! gateway's address, so clients that check their peer see what they asked for.
//!
//! Every program always lets the syscall proceed: a failure here must never break a client,
//! it only shows up in the counters.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use agent_common::{
    Addr6, CONFIG_PROXY_V6, CONFIG_READY, Config, LOOPBACK6, ORIGIN_MAX, Origin, PeerKey,
    TARGETS_MAX, TASK_COMM_LEN, TargetKey, counter, is_v4_mapped, v4_mapped,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
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
fn config() -> Option<&'static Config> {
    match CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_READY != 0 => Some(cfg),
        _ => {
            count(counter::NO_CONFIG);
            None
        }
    }
}

#[inline(always)]
fn lookup_target(addr: Addr6, port: u32) -> Option<u32> {
    // SAFETY: the value is copied out at once; a concurrent update can at worst hand back an
    // id that is being replaced, which only affects the id in the record.
    unsafe {
        if let Some(id) = TARGETS.get(TargetKey { addr, port }) {
            return Some(*id);
        }
        TARGETS.get(TargetKey { addr: [0; 4], port }).copied()
    }
}

/// Where a redirected connection should go instead, or None to leave it alone.
struct Redirect {
    to_v6: bool,
}

/// The checks and the origin record both hooks share. `dst` is in the canonical form
/// (IPv4-mapped for IPv4).
#[inline(always)]
fn intercept(sa: *mut bpf_sock_addr, dst: Addr6, port: u32) -> Option<(Redirect, &'static Config)> {
    let target_id = lookup_target(dst, port)?;
    let cfg = config()?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.agent_tgid {
        count(counter::SKIPPED_SELF);
        return None;
    }
    if cfg.mark != 0 {
        // SAFETY: sock_addr programs always get a valid, full socket in ctx->sk.
        let mark = unsafe { read_volatile(&raw const (*(*sa).__bindgen_anon_1.sk).mark) };
        if mark == cfg.mark {
            count(counter::SKIPPED_MARK);
            return None;
        }
    }
    if port == cfg.proxy_port && (dst == v4_mapped(cfg.proxy_ip4) || dst == LOOPBACK6) {
        count(counter::SKIPPED_PROXY_DST);
        return None;
    }
    let to_v6 = !is_v4_mapped(&dst);
    if to_v6 && cfg.flags & CONFIG_PROXY_V6 == 0 {
        count(counter::SKIPPED_NO_V6_PROXY);
        return None;
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
        return None;
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
    count(counter::REDIRECTED);
    Some((Redirect { to_v6 }, cfg))
}

#[inline(always)]
fn is_tcp(sa: *mut bpf_sock_addr) -> bool {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr for its whole run.
    unsafe { (*sa).type_ == SOCK_STREAM && (*sa).protocol == IPPROTO_TCP }
}

/// The port field of bpf_sock_addr holds a network-order u16 in its low bytes.
#[inline(always)]
fn host_port(user_port: u32) -> u32 {
    u32::from(u16::from_be(user_port as u16))
}

#[inline(always)]
fn wire_port(port: u32) -> u32 {
    u32::from((port as u16).to_be())
}

#[cgroup_sock_addr(connect4)]
pub fn mcptrail_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    // SAFETY: plain reads of the context.
    let (ip4, port) = unsafe { ((*sa).user_ip4, host_port((*sa).user_port)) };
    if let Some((_, cfg)) = intercept(sa, v4_mapped(ip4), port) {
        // SAFETY: connect4 programs may rewrite user_ip4 and user_port (32-bit stores).
        unsafe {
            (*sa).user_ip4 = cfg.proxy_ip4;
            (*sa).user_port = wire_port(cfg.proxy_port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mcptrail_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    // SAFETY: plain reads of the context, each at a constant offset as the verifier wants.
    let (dst, port) = unsafe {
        (
            [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ],
            host_port((*sa).user_port),
        )
    };
    if let Some((redirect, cfg)) = intercept(sa, dst, port) {
        // A v4-mapped destination on a dual-stack socket goes to the IPv4 listener through
        // its mapped address; a real IPv6 destination goes to [::1].
        let to = if redirect.to_v6 {
            LOOPBACK6
        } else {
            v4_mapped(cfg.proxy_ip4)
        };
        // SAFETY: connect6 programs may rewrite user_ip6 and user_port (32-bit stores).
        unsafe {
            (*sa).user_ip6[0] = to[0];
            (*sa).user_ip6[1] = to[1];
            (*sa).user_ip6[2] = to[2];
            (*sa).user_ip6[3] = to[3];
            (*sa).user_port = wire_port(cfg.proxy_port);
        }
    }
    ALLOW
}

/// The origin of a socket this agent redirected, by its cookie.
#[inline(always)]
fn redirected_origin(sa: *mut bpf_sock_addr) -> Option<Origin> {
    // SAFETY: reads from the context; the map value is copied out at once.
    unsafe {
        let cookie = bpf_get_socket_cookie(sa.cast());
        ORIGIN_COOKIE.get(cookie).copied()
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn mcptrail_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if let Some(origin) = redirected_origin(sa)
        && is_v4_mapped(&origin.dst_addr)
    {
        // SAFETY: getpeername4 programs may rewrite user_ip4 and user_port.
        unsafe {
            (*sa).user_ip4 = origin.dst_addr[3];
            (*sa).user_port = wire_port(origin.dst_port);
        }
        count(counter::PEERNAME_REWRITTEN);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn mcptrail_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if let Some(origin) = redirected_origin(sa) {
        // The stored form is already what an IPv6 socket reports: v4-mapped for IPv4.
        // SAFETY: getpeername6 programs may rewrite user_ip6 and user_port.
        unsafe {
            (*sa).user_ip6[0] = origin.dst_addr[0];
            (*sa).user_ip6[1] = origin.dst_addr[1];
            (*sa).user_ip6[2] = origin.dst_addr[2];
            (*sa).user_ip6[3] = origin.dst_addr[3];
            (*sa).user_port = wire_port(origin.dst_port);
        }
        count(counter::PEERNAME_REWRITTEN);
    }
    ALLOW
}

#[sock_ops]
pub fn mcptrail_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: reads from the context the kernel gave us.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let _ = ORIGIN_COOKIE.remove(cookie);
        }
        _ => {}
    }
    1
}

/// The client's own address on an established socket, in the canonical form.
#[inline(always)]
fn local_addr(ctx: &SockOpsContext) -> Option<Addr6> {
    let ops = ctx.ops;
    // SAFETY: plain context reads at constant offsets. All of them happen unconditionally
    // and volatile: were they inside the branches, LLVM would fold the IPv4 read and the last
    // IPv6 word into one load at a computed context offset, which the verifier rejects.
    let (family, ip4, ip6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
        )
    };
    match family {
        AF_INET => Some(v4_mapped(ip4)),
        AF_INET6 => Some(ip6),
        _ => None,
    }
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    // SAFETY: reads from the context the kernel gave us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once.
    let Some(origin) = (unsafe { ORIGIN_COOKIE.get(cookie) }).copied() else {
        note_possible_eviction(ctx);
        return;
    };
    let Some(addr) = local_addr(ctx) else {
        return;
    };
    let key = PeerKey {
        addr,
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
    // Keep the cookie entry for getpeername() until the socket closes, and ask to be told
    // when it does.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// A connection to the proxy whose cookie entry is gone was redirected and then evicted from
/// the LRU map before it was established: the proxy will refuse it; count why.
#[inline(always)]
fn note_possible_eviction(ctx: &SockOpsContext) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    // remote_port holds the network-order port shifted into the upper half of the word on
    // little-endian hosts (and in the lower half on big-endian ones); accept either.
    let remote_port = ctx.remote_port();
    let wire = wire_port(cfg.proxy_port);
    if remote_port != wire && remote_port != wire << 16 {
        return;
    }
    if ctx.family() == AF_INET && ctx.remote_ip4() != cfg.proxy_ip4 {
        return;
    }
    count(counter::ORIGIN_EVICTED);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
