//! Who a request came from, for access logs: the connection's peer, or,
//! when the peer is a trusted balancer (`trusted_proxies`), the address that balancer says it
//! forwarded for in `X-Forwarded-For`. The list is read from its right end (the hop nearest to us)
//! leftwards past every trusted address; the first untrusted one is the client. An untrusted peer's
//! `X-Forwarded-For` is ignored, so a client cannot choose the address it is logged and limited as.

use axum::http::HeaderMap;
use ipnet::IpNet;
use std::net::IpAddr;

/// The header a balancer appends the address it received a request from to.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// The client's address (module header).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    // A dual-stack listener sees an IPv4 peer as `::ffff:a.b.c.d`: compared as IPv4.
    let peer = peer.to_canonical();
    let is_trusted = |address: &IpAddr| trusted.iter().any(|net| net.contains(address));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Several headers count as one list, in order.
    let hops: Vec<&str> = headers
        .get_all(FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect();
    for hop in hops.iter().rev() {
        let Ok(address) = hop.trim().parse::<IpAddr>().map(|hop| hop.to_canonical()) else {
            // Not an address: nothing further left can be trusted.
            break;
        };
        client = address;
        if !is_trusted(&address) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(FORWARDED_FOR, HeaderValue::from_static(value));
        }
        headers
    }

    fn address(text: &str) -> IpAddr {
        text.parse()
            .unwrap_or_else(|_| panic!("{text} is an address"))
    }

    #[test]
    fn only_a_trusted_balancer_says_who_the_client_is() {
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap_or_else(|_| panic!("net"))];
        let balancer = address("127.0.0.9");
        let stranger = address("192.0.2.7");
        let forwarded = headers(&["198.51.100.1, 203.0.113.5"]);
        assert_eq!(
            client_address(balancer, &forwarded, &trusted),
            address("203.0.113.5"),
            "the hop the balancer saw, not what the client wrote before it"
        );
        assert_eq!(client_address(stranger, &forwarded, &trusted), stranger);
        assert_eq!(client_address(balancer, &forwarded, &[]), balancer);
        assert_eq!(
            client_address(balancer, &HeaderMap::new(), &trusted),
            balancer
        );
        let chained = headers(&["203.0.113.5", "127.0.0.3"]);
        assert_eq!(
            client_address(balancer, &chained, &trusted),
            address("203.0.113.5"),
            "trusted hops are skipped, across headers"
        );
        let mapped = address("::ffff:127.0.0.9");
        assert_eq!(
            client_address(mapped, &forwarded, &trusted),
            address("203.0.113.5"),
            "a balancer seen through a dual-stack listener is still trusted"
        );
        let garbage = headers(&["203.0.113.5, not-an-address, 127.0.0.3"]);
        assert_eq!(
            client_address(balancer, &garbage, &trusted),
            address("127.0.0.3"),
            "nothing left of a bad entry is believed"
        );
    }
}
