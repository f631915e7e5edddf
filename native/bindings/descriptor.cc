// The descriptor codec, for tooling and for tests whose peer is not a kvxfer engine.
#include "kvxfer/descriptor.h"

#include <pybind11/stl.h>

#include "bindings.h"

namespace kvxfer::py_bindings {
namespace {

py::bytes toBytes(const Bytes& b) { return py::bytes(reinterpret_cast<const char*>(b.data()), b.size()); }

}  // namespace

void registerDescriptor(py::module_& m) {
    m.def("decode_descriptor", [](py::bytes blob) {
        std::string data = blob;
        PeerDescriptor d =
            unwrap(decodeDescriptor(ByteView(reinterpret_cast<const uint8_t*>(data.data()), data.size())));
        py::dict out;
        out["engine_name"] = py::bytes(d.engine_name).attr("decode")("utf-8", "replace");
        out["instance_id"] = d.instance_id;
        out["host_id"] = d.host_id;
        out["pid"] = d.pid;
        py::list backends;
        for (const auto& b : d.backends) backends.append(py::make_tuple(b.name, toBytes(b.info)));
        out["backends"] = backends;
        py::list regions;
        for (const auto& r : d.regions) {
            py::dict rd;
            rd["id"] = r.id;
            rd["base_address"] = r.base_address;
            rd["length"] = r.length;
            rd["layout"] = r.layout ? py::cast(*r.layout) : py::none();
            rd["kind"] = r.kind;
            rd["device"] = r.device;
            py::list keys;
            for (const auto& k : r.remote_keys) keys.append(toBytes(k));
            rd["remote_keys"] = keys;
            regions.append(rd);
        }
        out["regions"] = regions;
        out["secret"] = toBytes(d.secret);
        return out;
    });
    m.def("encode_descriptor", [](py::dict d) {
        PeerDescriptor desc;
        desc.engine_name = d["engine_name"].cast<std::string>();
        desc.instance_id = d["instance_id"].cast<uint64_t>();
        desc.host_id = d.contains("host_id") ? d["host_id"].cast<std::string>() : "";
        desc.pid = d.contains("pid") ? d["pid"].cast<uint32_t>() : 0;
        for (auto item : d["backends"]) {
            auto t = item.cast<py::tuple>();
            std::string info = t[1].cast<py::bytes>();
            desc.backends.push_back({t[0].cast<std::string>(), Bytes(info.begin(), info.end())});
        }
        for (auto item : d["regions"]) {
            auto rd = item.cast<py::dict>();
            RegionDescriptor r;
            r.id = rd["id"].cast<uint32_t>();
            r.base_address = rd["base_address"].cast<uint64_t>();
            r.length = rd["length"].cast<uint64_t>();
            if (rd.contains("layout") && !rd["layout"].is_none()) r.layout = rd["layout"].cast<KvLayout>();
            if (rd.contains("kind")) r.kind = rd["kind"].cast<MemoryKind>();
            if (rd.contains("device")) r.device = rd["device"].cast<int32_t>();
            for (auto k : rd["remote_keys"]) {
                std::string key = k.cast<py::bytes>();
                r.remote_keys.emplace_back(key.begin(), key.end());
            }
            desc.regions.push_back(std::move(r));
        }
        if (d.contains("secret")) {
            std::string secret = d["secret"].cast<py::bytes>();
            desc.secret.assign(secret.begin(), secret.end());
        }
        return toBytes(encodeDescriptor(desc));
    });
}

}  // namespace kvxfer::py_bindings
