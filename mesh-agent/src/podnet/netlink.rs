//! Hand-written rtnetlink requests: what `ip route get`, `ip rule add` and `ip route add` do,
//! without a shell or a netlink crate.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;

/// One RTM_GETROUTE request over rtnetlink (what `ip route get` does).
pub fn route_oif(ip: Ipv4Addr) -> io::Result<Option<u32>> {
    let sock = socket()?;

    let total = NLMSG_HDRLEN + RTMSG_LEN + 8;
    let mut req = Vec::with_capacity(total);
    req.extend_from_slice(&(total as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
                                                // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    req.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    // rtattr RTA_DST
    req.extend_from_slice(&8u16.to_ne_bytes());
    req.extend_from_slice(&RTA_DST.to_ne_bytes());
    req.extend_from_slice(&ip.octets());

    // SAFETY: valid socket and buffer.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: valid socket and buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_route_reply(buf.get(..n as usize).unwrap_or_default())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_route_reply(msg: &[u8]) -> io::Result<Option<u32>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short netlink reply");
    let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(msg, 4).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(msg, NLMSG_HDRLEN).ok_or_else(bad)? as i32;
        return match errno {
            0 => Ok(None),
            e if e == -libc::ENETUNREACH || e == -libc::EHOSTUNREACH => Ok(None),
            e => Err(io::Error::from_raw_os_error(-e)),
        };
    }
    if kind != RTM_NEWROUTE {
        return Ok(None);
    }
    let mut at = NLMSG_HDRLEN + RTMSG_LEN;
    let end = len.min(msg.len());
    while at + 4 <= end {
        let alen = u16_at(msg, at).ok_or_else(bad)? as usize;
        let atype = u16_at(msg, at + 2).ok_or_else(bad)?;
        if alen < 4 {
            break;
        }
        if atype == RTA_OIF {
            return Ok(u32_at(msg, at + 4));
        }
        at += (alen + 3) & !3;
    }
    Ok(None)
}

const RTM_NEWRULE: u16 = 32;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
/// Rule priority: ahead of the main table (32766), after the local table (0).
const RULE_PRIORITY: u32 = 15_008;
/// The loopback interface's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn attr_u32(msg: &mut Vec<u8>, kind: u16, value: u32) {
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&value.to_ne_bytes());
}

/// Sends one request that creates something and waits for its acknowledgement; "already
/// exists" counts as success.
fn create(kind: u16, body: &[u8]) -> io::Result<()> {
    let sock = socket()?;
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    let total = NLMSG_HDRLEN + body.len();
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(body);
    // SAFETY: valid socket and buffer.
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: valid socket and buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let reply = buf.get(..n as usize).unwrap_or_default();
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short netlink reply");
    if u16_at(reply, 4).ok_or_else(bad)? != NLMSG_ERROR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "netlink answered without an acknowledgement",
        ));
    }
    match u32_at(reply, NLMSG_HDRLEN).ok_or_else(bad)? as i32 {
        0 => Ok(()),
        e if e == -libc::EEXIST => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// `ip [-6] rule add fwmark MARK/MASK lookup TABLE pref 15008`.
pub fn add_mark_rule(family: libc::c_int, mark: u32, mask: u32, table: u32) -> io::Result<()> {
    // fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
    let mut body = vec![family as u8, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr_u32(&mut body, FRA_FWMARK, mark);
    attr_u32(&mut body, FRA_FWMASK, mask);
    attr_u32(&mut body, FRA_TABLE, table);
    attr_u32(&mut body, FRA_PRIORITY, RULE_PRIORITY);
    create(RTM_NEWRULE, &body)
}

/// `ip route add local 0.0.0.0/0 dev lo table TABLE` (or `::/0` for IPv6).
pub fn add_local_default_route(family: libc::c_int, table: u32) -> io::Result<()> {
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    let mut body = vec![
        family as u8,
        0,
        0,
        0,
        0,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr_u32(&mut body, RTA_TABLE, table);
    attr_u32(&mut body, RTA_OIF, LOOPBACK_IFINDEX);
    create(RTM_NEWROUTE, &body)
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn route_reply_without_oif_is_none() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + RTMSG_LEN) as u32).to_ne_bytes());
        msg.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[0; RTMSG_LEN]);
        assert_eq!(parse_route_reply(&msg).unwrap(), None);
    }
}
