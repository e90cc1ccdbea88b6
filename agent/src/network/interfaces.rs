//! Network interfaces: the per-instance veth pair and the VXLAN device.
//!
//! Host-side veth names are `<link_prefix><8 hex of sha256(instance)>`, so
//! every interface this agent made is recognisable by its prefix and the
//! instance it belongs to is derivable from the name.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan};
use sha2::{Digest, Sha256};

use super::error::is_absent;
use super::NetworkError;

/// The instance-side interface name inside its namespace.
pub const INSTANCE_IF: &str = "eth0";
/// MAC address of every host-side veth end (as Calico does): the instance's
/// static neighbour entry for the gateway points at it.
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN encapsulation overhead over IPv4.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// The host-side veth name of `instance`.
pub fn host_if_name(prefix: &str, instance: &str) -> String {
    let digest = Sha256::digest(instance.as_bytes());
    format!("{prefix}{}", hex::encode(&digest[..4]))
}

/// The interface's name, from a link message.
pub fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn kind_of(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn vxlan_info(link: &LinkMessage) -> Vec<&InfoVxlan> {
    link.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })
        .flatten()
        .filter_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.iter()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The link called `name`, if it exists.
pub async fn get(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if is_absent(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// All links whose name starts with `prefix`, as (index, name).
pub async fn list_with_prefix(
    handle: &Handle,
    prefix: &str,
) -> Result<Vec<(u32, String)>, rtnetlink::Error> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(links
        .iter()
        .filter_map(|l| {
            let name = name_of(l)?;
            name.starts_with(prefix)
                .then(|| (l.header.index, name.to_owned()))
        })
        .collect())
}

/// Deletes a link by index; already gone is fine.
pub async fn delete(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    match handle.link().del(index).execute().await {
        Err(e) if !is_absent(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Creates the veth pair: `host_if` (up, [`HOST_MAC`]) here, its peer
/// [`INSTANCE_IF`] directly inside the namespace at `netns`.
pub async fn create_veth(
    handle: &Handle,
    host_if: &str,
    netns: &Path,
    mtu: u32,
) -> Result<(), NetworkError> {
    let ns = super::netns::open(netns)?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(INSTANCE_IF)
        .mtu(mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(host_if, INSTANCE_IF)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(mtu)
        .address(HOST_MAC.to_vec())
        .up()
        .build();
    let result = handle.link().add(msg).execute().await;
    drop(ns);
    result.map_err(|e| NetworkError::netlink(format!("veth {host_if}"), "creating veth pair", e))
}

/// Brings a link up.
pub async fn set_up(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

/// True if the link is administratively up.
pub fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

/// Makes sure the VXLAN device `name` exists with this VNI and local
/// address (recreating it if it differs), is up, and returns its index.
/// Its MTU is the kernel's default for a device without a lower device
/// (1500 minus the 50 bytes of encapsulation).
pub async fn ensure_vxlan(
    handle: &Handle,
    name: &str,
    vni: u32,
    local: Ipv4Addr,
) -> Result<u32, NetworkError> {
    let object = format!("vxlan device {name}");
    let existing = get(handle, name)
        .await
        .map_err(|e| NetworkError::netlink(&object, "looking up device", e))?;
    if let Some(link) = existing {
        let info = vxlan_info(&link);
        let matches = matches!(kind_of(&link), Some(InfoKind::Vxlan))
            && info.contains(&&InfoVxlan::Id(vni))
            && info.contains(&&InfoVxlan::Local(local))
            && info.contains(&&InfoVxlan::Port(VXLAN_PORT));
        if matches {
            if !is_up(&link) {
                set_up(handle, link.header.index)
                    .await
                    .map_err(|e| NetworkError::netlink(&object, "bringing device up", e))?;
            }
            return Ok(link.header.index);
        }
        tracing::info!(device = name, vni, %local, "replacing VXLAN device with different settings");
        delete(handle, link.header.index)
            .await
            .map_err(|e| NetworkError::netlink(&object, "deleting mismatched device", e))?;
    }
    let msg = LinkVxlan::new(name, vni)
        .local(local)
        .port(VXLAN_PORT)
        .learning(false)
        .up()
        .build();
    handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| NetworkError::netlink(&object, "creating device", e))?;
    let link = get(handle, name)
        .await
        .map_err(|e| NetworkError::netlink(&object, "looking up created device", e))?
        .ok_or_else(|| {
            NetworkError::netlink(
                &object,
                "looking up created device",
                rtnetlink::Error::RequestFailed,
            )
        })?;
    Ok(link.header.index)
}

/// The remote VTEPs of the device's all-zero FDB entries (where the device
/// floods unknown destinations: one entry per peer node).
pub async fn flood_entries(handle: &Handle, index: u32) -> Result<Vec<Ipv4Addr>, rtnetlink::Error> {
    let entries: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await?;
    Ok(entries
        .iter()
        .filter(|n| n.header.ifindex == index)
        .filter(|n| {
            n.attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l == &[0u8; 6]))
        })
        .filter_map(|n| {
            n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })
        })
        .collect())
}

fn flood_entry(index: u32, remote: Ipv4Addr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.header.kind = RouteType::Unspec;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            remote,
        )));
    msg
}

/// `bridge fdb append 00:00:00:00:00:00 dev <index> dst <remote>`.
pub async fn add_flood_entry(
    handle: &Handle,
    index: u32,
    remote: Ipv4Addr,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(flood_entry(
        index, remote,
    )));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
    let mut response = handle.clone().request(req)?;
    while let Some(msg) = futures::StreamExt::next(&mut response).await {
        if let NetlinkPayload::Error(e) = msg.payload {
            if e.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
    }
    Ok(())
}

/// `bridge fdb del 00:00:00:00:00:00 dev <index> dst <remote>`.
pub async fn del_flood_entry(
    handle: &Handle,
    index: u32,
    remote: Ipv4Addr,
) -> Result<(), rtnetlink::Error> {
    match handle
        .neighbours()
        .del(flood_entry(index, remote))
        .execute()
        .await
    {
        Err(e) if !is_absent(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Sets a sysctl unless it already has `value`. A read-only `/proc/sys`
/// (some container sandboxes) is not fatal: the caller says what is lost.
pub fn ensure_sysctl(path: &str, value: &str, without: &str) -> Result<(), NetworkError> {
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    match std::fs::write(path, value) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            tracing::warn!(
                path,
                value,
                "cannot set a sysctl: /proc/sys is read-only here; {without}"
            );
            Ok(())
        }
        Err(e) => Err(NetworkError::io("writing sysctl", path, e)),
    }
}
