//! Routes this agent installs in its own namespace, each kind marked with
//! its own route protocol number so that foreign routes are never touched:
//!
//! - [`INSTANCE_PROTO`]: `<instance ip>/32 dev <host veth> scope link`;
//! - [`PEER_PROTO`]: `<peer pod CIDR> via <peer node>` (direct) or
//!   `<peer pod CIDR> via <peer .1> dev <vxlan> onlink` (VXLAN).
//!
//! Both live in the main table.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::error::is_absent;

/// Route protocol of the /32 routes to this agent's instances ("ironmesh
/// instance"; see `/etc/iproute2/rt_protos` for the ones taken).
pub const INSTANCE_PROTO: u8 = 73;
/// Route protocol of the routes to other nodes' pod CIDRs.
pub const PEER_PROTO: u8 = 74;

/// One route of ours, as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OurRoute {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    /// The message as dumped, to delete exactly this route.
    pub message: RouteMessage,
}

/// Our routes of protocol `proto` in the main table.
pub async fn list(handle: &Handle, proto: u8) -> Result<Vec<OurRoute>, rtnetlink::Error> {
    let all: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    Ok(all
        .into_iter()
        .filter(|r| {
            u8::from(r.header.protocol) == proto && r.header.table == RouteHeader::RT_TABLE_MAIN
        })
        .filter_map(|r| {
            let mut dst = None;
            let mut gateway = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let dst = Ipv4Net::new(dst?, r.header.destination_prefix_length).ok()?;
            Some(OurRoute {
                dst,
                gateway,
                oif,
                message: r,
            })
        })
        .collect())
}

/// `ip route replace <ip>/32 dev <oif> scope link proto 73`.
pub async fn replace_instance(
    handle: &Handle,
    ip: Ipv4Addr,
    oif: u32,
) -> Result<(), rtnetlink::Error> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(oif)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::from(INSTANCE_PROTO))
        .build();
    handle.route().add(msg).replace().execute().await
}

/// `ip route replace <dst> via <gateway> [dev <oif> onlink] proto 74`.
pub async fn replace_peer(
    handle: &Handle,
    dst: Ipv4Net,
    gateway: Ipv4Addr,
    onlink_dev: Option<u32>,
) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .gateway(gateway)
        .protocol(RouteProtocol::from(PEER_PROTO));
    if let Some(oif) = onlink_dev {
        b = b.output_interface(oif).onlink();
    }
    handle.route().add(b.build()).replace().execute().await
}

/// Deletes one route as dumped; already gone is fine.
pub async fn delete(handle: &Handle, route: &OurRoute) -> Result<(), rtnetlink::Error> {
    match handle.route().del(route.message.clone()).execute().await {
        Err(e) if !is_absent(&e) => Err(e),
        _ => Ok(()),
    }
}
