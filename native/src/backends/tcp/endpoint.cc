// TCP backend: the listen address (TcpConfig::listen) and the endpoint info a descriptor
// carries (port + this host's IPv4 addresses), encoded and decoded.
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstring>

#include "backends/tcp/tcp_internal.h"

namespace kvxfer::tcp {
std::optional<BindSpec> parseBind(const std::string& spec, bool allow_bare_host) {
    const auto colon = spec.rfind(':');
    if (colon == std::string::npos && !allow_bare_host) return std::nullopt;
    const std::string host = colon == std::string::npos ? spec : spec.substr(0, colon);
    const std::string port = colon == std::string::npos ? "" : spec.substr(colon + 1);
    BindSpec out;
    if (host.empty() || host == "*" || host == "0.0.0.0") {
        out.host = htonl(INADDR_ANY);
    } else if (host == "localhost") {
        out.host = htonl(INADDR_LOOPBACK);
    } else {
        in_addr a{};
        if (::inet_pton(AF_INET, host.c_str(), &a) != 1) return std::nullopt;
        out.host = a.s_addr;
    }
    if (!port.empty()) {
        if (port.size() > 5 ||
            !std::all_of(port.begin(), port.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
            return std::nullopt;
        }
        const unsigned long p = std::stoul(port);
        if (p > 65535) return std::nullopt;
        out.port = static_cast<uint16_t>(p);
    }
    return out;
}

std::vector<uint32_t> localAddresses() {
    std::vector<uint32_t> outer, loop;
    ifaddrs* list = nullptr;
    if (::getifaddrs(&list) == 0) {
        for (ifaddrs* i = list; i; i = i->ifa_next) {
            if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP)) continue;
            const uint32_t a = reinterpret_cast<const sockaddr_in*>(i->ifa_addr)->sin_addr.s_addr;
            auto& v = (i->ifa_flags & IFF_LOOPBACK) ? loop : outer;
            if (std::find(v.begin(), v.end(), a) == v.end()) v.push_back(a);
        }
        ::freeifaddrs(list);
    }
    if (loop.empty()) loop.push_back(htonl(INADDR_LOOPBACK));
    outer.insert(outer.end(), loop.begin(), loop.end());
    if (outer.size() > 32) outer.erase(outer.begin() + 31, outer.end() - 1);  // keep loopback
    return outer;
}

Bytes encodeEndpoint(uint16_t port, const std::vector<uint32_t>& addrs) {
    Bytes out(4 + 4 * addrs.size());
    out[0] = 1;
    out[1] = static_cast<uint8_t>(addrs.size());
    putLe(out.data() + 2, port, 2);
    for (size_t i = 0; i < addrs.size(); ++i) std::memcpy(out.data() + 4 + 4 * i, &addrs[i], 4);
    return out;
}

bool decodeEndpoint(ByteView info, uint16_t* port, std::vector<uint32_t>* addrs) {
    if (info.size() < 8 || info[0] != 1) return false;
    const size_t n = info[1];
    if (n == 0 || n > 32 || info.size() != 4 + 4 * n) return false;
    *port = static_cast<uint16_t>(getLe(info.data() + 2, 2));
    if (*port == 0) return false;
    addrs->resize(n);
    for (size_t i = 0; i < n; ++i) std::memcpy(&(*addrs)[i], info.data() + 4 + 4 * i, 4);
    return true;
}

}  // namespace kvxfer::tcp
