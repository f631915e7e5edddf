// device: RDMA device, port and GID discovery, and the opened device (context + PD).
//
// Selection (IbverbsConfig: device, gid_index, port_num; see kvxfer/config.h):
//   device ""     every device in libibverbs' order, first ACTIVE port, best GID
//   "rxe0"        that device, first ACTIVE port (port_num overrides), best GID
//   "rxe0:3"      that device, GID index 3 (gid_index is used when no index is given)
// Best GID on Ethernet (RoCE): an IPv4-mapped RoCE v2 GID, then any other routable RoCE v2
// GID, then a link-local RoCE v2 GID, then RoCE v1; lowest index among equals. On
// InfiniBand: GID 0 (the port GID) and the port's LID.
#pragma once

#include <memory>
#include <string>

#include "backends/ibverbs/verbs_loader.h"
#include "kvxfer/config.h"

namespace kvxfer::ib {

enum class GidType : uint8_t { kUnknown = 0, kIb, kRoceV1, kRoceV2 };
const char* gidTypeName(GidType type);
std::string gidToString(const ibv_gid& gid);
bool gidIsZero(const ibv_gid& gid);
bool gidIsIpv4Mapped(const ibv_gid& gid);
uint32_t mtuBytes(ibv_mtu mtu);

struct DeviceSelector {
    std::string device;  // "" = any
    int gid_index = -1;  // -1 = choose
    int port = 0;        // 0 = first active
};
// The selector of a configuration ("dev[:gid]" in `device`, plus gid_index and port_num).
Result<DeviceSelector> selectorFrom(const IbverbsConfig& config);

// An opened device: context, one protection domain, and the chosen port and GID.
// Shared (shared_ptr) by everything created on it, so the PD and the context close only
// after the last MR, QP, CQ, SRQ and AH is gone.
class Device {
public:
    ~Device();
    Device(const Device&) = delete;
    Device& operator=(const Device&) = delete;

    static Result<std::shared_ptr<Device>> open(const VerbsApi& verbs, const DeviceSelector& selector);

    const VerbsApi& verbs() const { return verbs_; }
    ibv_context* context() const { return context_; }
    ibv_pd* pd() const { return pd_; }
    const std::string& name() const { return name_; }
    uint8_t port() const { return port_; }
    const ibv_port_attr& portAttr() const { return port_attr_; }
    const ibv_device_attr& attr() const { return attr_; }
    int gidIndex() const { return gid_index_; }
    const ibv_gid& gid() const { return gid_; }
    GidType gidType() const { return gid_type_; }
    bool ethernet() const { return port_attr_.link_layer == IBV_LINK_LAYER_ETHERNET; }
    ibv_mtu activeMtu() const { return port_attr_.active_mtu; }
    std::string describe() const;

private:
    explicit Device(const VerbsApi& verbs) : verbs_(verbs) {}
    const VerbsApi& verbs_;
    ibv_context* context_ = nullptr;
    ibv_pd* pd_ = nullptr;
    std::string name_;
    uint8_t port_ = 0;
    ibv_port_attr port_attr_{};
    ibv_device_attr attr_{};
    int gid_index_ = -1;
    ibv_gid gid_{};
    GidType gid_type_ = GidType::kUnknown;
};

// OK when some device has an ACTIVE port with a usable GID (honours $KVXFER_IB_DEVICE);
// otherwise the reason, for list_backends().
Status probeDevices(const VerbsApi& verbs);

}  // namespace kvxfer::ib
