#include "backends/ibverbs/device.h"

#include <arpa/inet.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <vector>

namespace kvxfer::ib {
namespace {

const char* portStateName(ibv_port_state s) {
    switch (s) {
        case IBV_PORT_NOP:
            return "NOP";
        case IBV_PORT_DOWN:
            return "DOWN";
        case IBV_PORT_INIT:
            return "INIT";
        case IBV_PORT_ARMED:
            return "ARMED";
        case IBV_PORT_ACTIVE:
            return "ACTIVE";
        case IBV_PORT_ACTIVE_DEFER:
            return "ACTIVE_DEFER";
    }
    return "UNKNOWN";
}

bool parseInt(const std::string& s, int* out) {
    if (s.empty() || s.size() > 6) return false;
    int v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') return false;
        v = v * 10 + (c - '0');
    }
    *out = v;
    return true;
}

GidType gidTypeFromSysfs(const std::string& dev, int port, int index) {
    std::ifstream f("/sys/class/infiniband/" + dev + "/ports/" + std::to_string(port) + "/gid_attrs/types/" +
                    std::to_string(index));
    std::string line;
    if (!std::getline(f, line)) return GidType::kUnknown;
    if (line.find("v2") != std::string::npos) return GidType::kRoceV2;
    if (line.find("RoCE") != std::string::npos) return GidType::kRoceV1;
    return GidType::kUnknown;
}

struct GidCandidate {
    int index = -1;
    ibv_gid gid{};
    GidType type = GidType::kUnknown;
    int score = 0;
};

// Reads GID `index`; false when the entry is empty or unreadable.
bool readGid(const VerbsApi& v, ibv_context* ctx, const std::string& dev, uint8_t port, bool ethernet,
             int index, GidCandidate* out) {
    out->index = index;
    if (v.query_gid_ex != nullptr) {
        ibv_gid_entry e{};
        if (v.query_gid_ex(ctx, port, static_cast<uint32_t>(index), &e, 0, sizeof(e)) == 0) {
            out->gid = e.gid;
            out->type = e.gid_type == IBV_GID_TYPE_ROCE_V2   ? GidType::kRoceV2
                        : e.gid_type == IBV_GID_TYPE_ROCE_V1 ? (ethernet ? GidType::kRoceV1 : GidType::kIb)
                                                             : GidType::kIb;
            if (!ethernet) out->type = GidType::kIb;
            return !gidIsZero(out->gid);
        }
        // ENODATA: empty entry. Other errors: fall back to the plain query below.
        if (errno == ENODATA) return false;
    }
    if (v.query_gid(ctx, port, index, &out->gid) != 0 || gidIsZero(out->gid)) return false;
    out->type = ethernet ? gidTypeFromSysfs(dev, port, index) : GidType::kIb;
    return true;
}

int gidScore(const GidCandidate& c, bool ethernet) {
    if (!ethernet) return c.index == 0 ? 4 : 1;
    const bool link_local = c.gid.raw[0] == 0xfe && (c.gid.raw[1] & 0xc0) == 0x80;
    switch (c.type) {
        case GidType::kRoceV2:
            return gidIsIpv4Mapped(c.gid) ? 4 : link_local ? 2 : 3;
        case GidType::kRoceV1:
            return 1;
        case GidType::kUnknown:
            return gidIsIpv4Mapped(c.gid) ? 2 : 1;  // no type info: guess
        case GidType::kIb:
            return 1;
    }
    return 0;
}

struct PortChoice {
    uint8_t port = 0;
    ibv_port_attr attr{};
    GidCandidate gid;
};

// Picks a port and GID on an opened device; the error explains why none fits.
Result<PortChoice> choosePort(const VerbsApi& v, ibv_context* ctx, const std::string& dev,
                              const ibv_device_attr& attr, const DeviceSelector& sel) {
    std::string why;
    for (int p = 1; p <= attr.phys_port_cnt; ++p) {
        if (sel.port != 0 && p != sel.port) continue;
        PortChoice c;
        c.port = static_cast<uint8_t>(p);
        if (v.queryPort(ctx, c.port, &c.attr) != 0) {
            why += (why.empty() ? "" : "; ") + dev + " port " + std::to_string(p) +
                   ": ibv_query_port failed: " + std::strerror(errno);
            continue;
        }
        if (c.attr.state != IBV_PORT_ACTIVE) {
            why += (why.empty() ? "" : "; ") + dev + " port " + std::to_string(p) + " is " +
                   portStateName(c.attr.state);
            continue;
        }
        const bool eth = c.attr.link_layer == IBV_LINK_LAYER_ETHERNET;
        if (sel.gid_index >= 0) {
            if (sel.gid_index >= c.attr.gid_tbl_len ||
                !readGid(v, ctx, dev, c.port, eth, sel.gid_index, &c.gid)) {
                why += (why.empty() ? "" : "; ") + dev + " port " + std::to_string(p) + " GID index " +
                       std::to_string(sel.gid_index) + " is empty or out of range (table has " +
                       std::to_string(c.attr.gid_tbl_len) + " entries)";
                continue;
            }
            c.gid.score = gidScore(c.gid, eth);
            return c;
        }
        GidCandidate best;
        for (int i = 0; i < c.attr.gid_tbl_len && i < 1024; ++i) {
            GidCandidate g;
            if (!readGid(v, ctx, dev, c.port, eth, i, &g)) continue;
            g.score = gidScore(g, eth);
            if (g.score > best.score) best = g;
            if (!eth) break;  // InfiniBand: GID 0
        }
        if (best.index < 0) {
            why += (why.empty() ? "" : "; ") + dev + " port " + std::to_string(p) +
                   " has no usable GID (on RoCE, give the netdev an IP address)";
            continue;
        }
        c.gid = best;
        return c;
    }
    if (why.empty()) why = dev + " has no port " + std::to_string(sel.port);
    return Status::unsupported(why);
}

}  // namespace

const char* gidTypeName(GidType type) {
    switch (type) {
        case GidType::kIb:
            return "IB";
        case GidType::kRoceV1:
            return "RoCE v1";
        case GidType::kRoceV2:
            return "RoCE v2";
        case GidType::kUnknown:
            return "unknown type";
    }
    return "?";
}

std::string gidToString(const ibv_gid& gid) {
    char buf[INET6_ADDRSTRLEN] = {};
    if (::inet_ntop(AF_INET6, gid.raw, buf, sizeof(buf)) == nullptr) return "?";
    return buf;
}

bool gidIsZero(const ibv_gid& gid) {
    for (uint8_t b : gid.raw) {
        if (b != 0) return false;
    }
    return true;
}

bool gidIsIpv4Mapped(const ibv_gid& gid) {
    for (int i = 0; i < 10; ++i) {
        if (gid.raw[i] != 0) return false;
    }
    return gid.raw[10] == 0xff && gid.raw[11] == 0xff;
}

uint32_t mtuBytes(ibv_mtu mtu) {
    switch (mtu) {
        case IBV_MTU_256:
            return 256;
        case IBV_MTU_512:
            return 512;
        case IBV_MTU_1024:
            return 1024;
        case IBV_MTU_2048:
            return 2048;
        case IBV_MTU_4096:
            return 4096;
    }
    return 0;
}

Result<DeviceSelector> selectorFrom(const IbverbsConfig& config) {
    const std::string& s = config.device;
    DeviceSelector sel;
    const auto colon = s.find(':');
    sel.device = s.substr(0, colon);
    if (colon != std::string::npos) {
        if (!parseInt(s.substr(colon + 1), &sel.gid_index)) {
            return Status::invalidArgument("ibverbs device '" + s +
                                           "' must be DEVICE or DEVICE:GID_INDEX (e.g. rxe0:1)");
        }
    } else {
        sel.gid_index = config.gid_index;
    }
    if (config.port_num < 0 || config.port_num > 255) {
        return Status::invalidArgument("ibverbs port_num " + std::to_string(config.port_num) +
                                       " is not a port number");
    }
    sel.port = config.port_num;
    return sel;
}

Device::~Device() {
    if (pd_ != nullptr) verbs_.dealloc_pd(pd_);
    if (context_ != nullptr) verbs_.close_device(context_);
}

Result<std::shared_ptr<Device>> Device::open(const VerbsApi& v, const DeviceSelector& sel) {
    int n = 0;
    ibv_device** list = v.get_device_list(&n);
    if (list == nullptr) {
        const int err = errno;
        return Status::unsupported(std::string("no RDMA device found: ibv_get_device_list failed (") +
                                   std::strerror(err) +
                                   "); this kernel has no RDMA devices or no RDMA support loaded");
    }
    std::string why, names;
    std::shared_ptr<Device> chosen;
    for (int i = 0; i < n && !chosen; ++i) {
        const std::string name = v.get_device_name(list[i]);
        names += (names.empty() ? "" : ", ") + name;
        if (!sel.device.empty() && name != sel.device) continue;
        std::shared_ptr<Device> d(new Device(v));
        d->name_ = name;
        d->context_ = v.open_device(list[i]);
        if (d->context_ == nullptr) {
            why += (why.empty() ? "" : "; ") + name + ": ibv_open_device failed: " + std::strerror(errno);
            continue;
        }
        if (v.query_device(d->context_, &d->attr_) != 0) {
            why += (why.empty() ? "" : "; ") + name + ": ibv_query_device failed: " + std::strerror(errno);
            continue;
        }
        auto port = choosePort(v, d->context_, name, d->attr_, sel);
        if (!port.isOk()) {
            why += (why.empty() ? "" : "; ") + port.status().message();
            continue;
        }
        d->port_ = port->port;
        d->port_attr_ = port->attr;
        d->gid_index_ = port->gid.index;
        d->gid_ = port->gid.gid;
        d->gid_type_ = port->gid.type;
        d->pd_ = v.alloc_pd(d->context_);
        if (d->pd_ == nullptr) {
            why += (why.empty() ? "" : "; ") + name + ": ibv_alloc_pd failed: " + std::strerror(errno);
            continue;
        }
        chosen = std::move(d);
    }
    v.free_device_list(list);
    if (chosen) return chosen;
    if (n == 0) return Status::unsupported("no RDMA device found (libibverbs lists 0 devices)");
    if (!sel.device.empty() && why.empty()) {
        return Status::unsupported("RDMA device '" + sel.device + "' not found (devices: " + names + ")");
    }
    return Status::unsupported("no usable RDMA port: " + why);
}

std::string Device::describe() const {
    return name_ + " port " + std::to_string(port_) + ", GID[" + std::to_string(gid_index_) + "] " +
           gidToString(gid_) + " " + gidTypeName(gid_type_) + ", MTU " +
           std::to_string(mtuBytes(activeMtu()));
}

Status probeDevices(const VerbsApi& v) {
    EngineConfig config;
    if (Status st = applyEnvironment(config); !st.isOk()) return st;
    auto sel = selectorFrom(config.backend.ibverbs);
    if (!sel.isOk()) return sel.status();
    auto dev = Device::open(v, *sel);
    return dev.isOk() ? Status::ok() : dev.status();
}

}  // namespace kvxfer::ib
