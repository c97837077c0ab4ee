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
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    let mut body = vec![libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0];
    body.extend_from_slice(&0u32.to_ne_bytes());
    // rtattr RTA_DST
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&RTA_DST.to_ne_bytes());
    body.extend_from_slice(&ip.octets());
    let sock = request(RTM_GETROUTE, libc::NLM_F_REQUEST, &body)?;
    let mut buf = vec![0u8; 8192];
    parse_route_reply(receive(&sock, &mut buf)?)
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

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NLMSG_DONE: u16 = 3;
const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
/// Attribute types carry flags in their top bits (nested, byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The attributes of one message body, from `at`: (type, value).
fn attrs(msg: &[u8], mut at: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while let (Some(len), Some(kind)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
        let len = len as usize;
        if len < 4 {
            break;
        }
        let Some(value) = msg.get(at + 4..at + len) else {
            break;
        };
        out.push((kind & NLA_TYPE_MASK, value));
        at += (len + 3) & !3;
    }
    out
}

/// One link of a dump: (index, name, the id of its peer's namespace).
pub type VethLink = (u32, String, Option<i32>);

/// Every veth of the current namespace, with the id (as this namespace knows it) of the
/// namespace its peer is in (`ip -d link show type veth`).
pub fn veths() -> io::Result<Vec<VethLink>> {
    // ifinfomsg: AF_UNSPEC, all links
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_DUMP;
    let sock = request(RTM_GETLINK, flags, &[0u8; IFINFOMSG_LEN])?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let mut rest = receive(&sock, &mut buf)?;
        if rest.is_empty() {
            return Ok(out);
        }
        while let (Some(len), Some(kind)) = (u32_at(rest, 0), u16_at(rest, 4)) {
            let len = len as usize;
            let Some(msg) = rest.get(..len).filter(|_| len >= NLMSG_HDRLEN) else {
                return Ok(out);
            };
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = u32_at(msg, NLMSG_HDRLEN).unwrap_or(0) as i32;
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWLINK => {
                    let index = u32_at(msg, NLMSG_HDRLEN + 4).unwrap_or(0);
                    let (mut name, mut veth, mut peer_ns) = (String::new(), false, None);
                    for (kind, value) in attrs(msg, NLMSG_HDRLEN + IFINFOMSG_LEN) {
                        match kind {
                            IFLA_IFNAME => {
                                name = String::from_utf8_lossy(value)
                                    .trim_end_matches('\0')
                                    .to_owned();
                            }
                            IFLA_LINKINFO => {
                                veth = attrs(value, 0)
                                    .iter()
                                    .any(|(k, v)| *k == IFLA_INFO_KIND && v.starts_with(b"veth"));
                            }
                            IFLA_LINK_NETNSID => {
                                peer_ns = u32_at(value, 0).map(|v| v as i32);
                            }
                            _ => {}
                        }
                    }
                    if veth {
                        out.push((index, name, peer_ns));
                    }
                }
                _ => {}
            }
            rest = rest.get((len + 3) & !3..).unwrap_or_default();
        }
    }
}

/// The id the current namespace knows the namespace `fd` by (`ip netns list-id`), if it has
/// given it one.
pub fn nsid_of(fd: std::os::fd::RawFd) -> io::Result<Option<i32>> {
    let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0]; // rtgenmsg, padded
    attr_u32(&mut body, NETNSA_FD, fd as u32);
    let sock = request(RTM_GETNSID, libc::NLM_F_REQUEST, &body)?;
    let mut buf = [0u8; 1024];
    let msg = receive(&sock, &mut buf)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short netlink reply");
    match u16_at(msg, 4).ok_or_else(bad)? {
        NLMSG_ERROR => {
            let errno = u32_at(msg, NLMSG_HDRLEN).ok_or_else(bad)? as i32;
            Err(io::Error::from_raw_os_error(-errno))
        }
        RTM_NEWNSID => Ok(attrs(msg, NLMSG_HDRLEN + 4)
            .into_iter()
            .find(|(k, _)| *k == NETNSA_NSID)
            .and_then(|(_, v)| u32_at(v, 0))
            .map(|id| id as i32)
            .filter(|id| *id >= 0)),
        _ => Ok(None),
    }
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

/// Opens a socket and sends one message on it: a netlink header (`kind`, `flags`), then `body`.
fn request(kind: u16, flags: libc::c_int, body: &[u8]) -> io::Result<OwnedFd> {
    let sock = socket()?;
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
    Ok(sock)
}

/// Receives one datagram of replies into `buf`.
fn receive<'a>(sock: &OwnedFd, buf: &'a mut [u8]) -> io::Result<&'a [u8]> {
    // SAFETY: valid socket and buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.get(..n as usize).unwrap_or_default())
}

fn attr_u32(msg: &mut Vec<u8>, kind: u16, value: u32) {
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&value.to_ne_bytes());
}

/// Sends one request that creates something and waits for its acknowledgement; "already
/// exists" counts as success.
fn create(kind: u16, body: &[u8]) -> io::Result<()> {
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    let sock = request(kind, flags, body)?;
    let mut buf = [0u8; 1024];
    let reply = receive(&sock, &mut buf)?;
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
