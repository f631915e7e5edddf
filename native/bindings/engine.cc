// Engine, Region, Peer, KvLayout, memory kinds and host buffers. Every call that can
// block or spin releases the GIL.
#include "kvxfer/engine.h"

#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "kvxfer/host_memory.h"

namespace kvxfer::py_bindings {
namespace {

py::object layoutOrNone(const std::optional<KvLayout>& l) { return l ? py::cast(*l) : py::none(); }

py::dict capsDict(const BackendCaps& c) {
    py::dict d;
    py::list ops, kinds;
    for (Op op : {Op::kWrite, Op::kRead}) {
        if (c.supports(op)) ops.append(opName(op));
    }
    for (uint32_t k = 0; k < kMemoryKindCount; ++k) {
        if (c.supports(static_cast<MemoryKind>(k))) kinds.append(memoryKindName(static_cast<MemoryKind>(k)));
    }
    d["ops"] = ops;
    d["memory_kinds"] = kinds;
    d["same_process_only"] = c.same_process_only;
    d["same_host_only"] = c.same_host_only;
    d["notifications"] = c.notifications;
    d["max_run_bytes"] = c.max_run_bytes;
    d["lanes"] = c.lanes;
    d["inline_max_bytes"] = c.inline_max_bytes;
    return d;
}

Region& checkedRegion(const std::shared_ptr<Region>& r) {
    if (!r) throw StatusError(Status::invalidArgument("region is None"));
    return *r;
}

}  // namespace

void registerEngine(py::module_& m) {
    py::enum_<MemoryKind>(m, "MemoryKind")
        .value("HOST", MemoryKind::kHost)
        .value("HOST_SHAREABLE", MemoryKind::kHostShareable)
        .value("CUDA", MemoryKind::kCuda);

    py::class_<KvLayout>(m, "KvLayout")
        .def(py::init([](int64_t num_layers, int64_t num_kv, int64_t num_blocks, int64_t block_bytes,
                         int64_t block_stride, int64_t kv_stride, int64_t layer_stride, int64_t offset) {
                 const std::pair<const char*, int64_t> fields[] = {
                     {"num_layers", num_layers},     {"num_kv", num_kv},
                     {"num_blocks", num_blocks},     {"block_bytes", block_bytes},
                     {"block_stride", block_stride}, {"kv_stride", kv_stride},
                     {"layer_stride", layer_stride}, {"offset", offset}};
                 for (const auto& [name, v] : fields) {
                     if (v < 0) {
                         throw StatusError(Status::invalidArgument(
                             std::string("KvLayout.") + name + " must be >= 0, got " + std::to_string(v)));
                     }
                 }
                 if (num_layers > UINT32_MAX || num_kv > UINT32_MAX) {
                     throw StatusError(Status::invalidArgument("KvLayout.num_layers/num_kv exceed 2**32-1"));
                 }
                 KvLayout l{static_cast<uint32_t>(num_layers),   static_cast<uint32_t>(num_kv),
                            static_cast<uint64_t>(num_blocks),   static_cast<uint64_t>(block_bytes),
                            static_cast<uint64_t>(block_stride), static_cast<uint64_t>(kv_stride),
                            static_cast<uint64_t>(layer_stride), static_cast<uint64_t>(offset)};
                 return l.normalized();
             }),
             py::kw_only(), py::arg("num_layers") = 1, py::arg("num_kv") = 1, py::arg("num_blocks"),
             py::arg("block_bytes"), py::arg("block_stride") = 0, py::arg("kv_stride") = 0,
             py::arg("layer_stride") = 0, py::arg("offset") = 0)
        .def_readonly("num_layers", &KvLayout::num_layers)
        .def_readonly("num_kv", &KvLayout::num_kv)
        .def_readonly("num_blocks", &KvLayout::num_blocks)
        .def_readonly("block_bytes", &KvLayout::block_bytes)
        .def_readonly("block_stride", &KvLayout::block_stride)
        .def_readonly("kv_stride", &KvLayout::kv_stride)
        .def_readonly("layer_stride", &KvLayout::layer_stride)
        .def_readonly("offset", &KvLayout::offset)
        .def("piece_offset", &KvLayout::pieceOffset, py::arg("layer"), py::arg("kv"), py::arg("block"))
        .def("validate", [](const KvLayout& l, uint64_t region_bytes) { check(l.validate(region_bytes)); })
        .def("__eq__", [](const KvLayout& a, const KvLayout& b) { return a == b; })
        .def("__repr__", [](const KvLayout& l) {
            return "KvLayout(num_layers=" + std::to_string(l.num_layers) +
                   ", num_kv=" + std::to_string(l.num_kv) + ", num_blocks=" + std::to_string(l.num_blocks) +
                   ", block_bytes=" + std::to_string(l.block_bytes) +
                   ", block_stride=" + std::to_string(l.block_stride) +
                   ", kv_stride=" + std::to_string(l.kv_stride) +
                   ", layer_stride=" + std::to_string(l.layer_stride) +
                   ", offset=" + std::to_string(l.offset) + ")";
        });

    py::class_<Region, std::shared_ptr<Region>>(m, "Region")
        .def_property_readonly("id", &Region::id)
        .def_property_readonly("address",
                               [](const Region& r) { return reinterpret_cast<uintptr_t>(r.base()); })
        .def_property_readonly("nbytes", &Region::length)
        .def_property_readonly("kind", &Region::kind)
        .def_property_readonly("device", &Region::device)
        .def_property_readonly("layout", [](const Region& r) { return layoutOrNone(r.layout()); })
        .def("__repr__", [](const Region& r) {
            return "<kvxfer.Region id=" + std::to_string(r.id()) + " nbytes=" + std::to_string(r.length()) +
                   " " + memoryKindName(r.kind()) + ">";
        });

    py::class_<RegionDescriptor>(m, "RemoteRegion")
        .def_readonly("id", &RegionDescriptor::id)
        .def_readonly("nbytes", &RegionDescriptor::length)
        .def_readonly("kind", &RegionDescriptor::kind)
        .def_readonly("device", &RegionDescriptor::device)
        .def_property_readonly("layout", [](const RegionDescriptor& r) { return layoutOrNone(r.layout); })
        .def("__repr__", [](const RegionDescriptor& r) {
            return "<kvxfer.RemoteRegion id=" + std::to_string(r.id) + " nbytes=" + std::to_string(r.length) +
                   " " + memoryKindName(r.kind) + ">";
        });

    py::class_<Peer, std::shared_ptr<Peer>>(m, "Peer")
        .def_property_readonly(
            "name", [](const Peer& p) { return py::bytes(p.name()).attr("decode")("utf-8", "replace"); })
        .def_property_readonly("instance_id", &Peer::instanceId)
        .def_property_readonly("backend", &Peer::backendName)
        .def_property_readonly("regions", [](const Peer& p) { return p.descriptor()->regions; })
        .def_property_readonly("removed", &Peer::removed)
        .def("__repr__", [](const Peer& p) {
            return py::str("<kvxfer.Peer {} via {}>")
                .format(py::bytes(p.name()).attr("decode")("utf-8", "replace"), p.backendName());
        });

    py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
        .def(py::init([](const EngineConfig& config) {
                 py::gil_scoped_release nogil;
                 return unwrap(Engine::create(config));
             }),
             py::arg("config"))
        .def_property_readonly("name", &Engine::name)
        .def_property_readonly("config", &Engine::config)
        .def_property_readonly("instance_id", &Engine::instanceId)
        .def_property_readonly("backends", &Engine::backendNames)
        .def("backend_caps",
             [](const Engine& e) {
                 py::dict out;
                 const auto names = e.backendNames();
                 const auto caps = e.backendCaps();
                 for (size_t i = 0; i < names.size(); ++i) out[py::str(names[i])] = capsDict(caps[i]);
                 return out;
             })
        .def("describe_backends", &Engine::describeBackends)
        .def(
            "register_ptr",
            [](Engine& e, uintptr_t ptr, uint64_t nbytes, std::optional<KvLayout> layout, py::object owner,
               MemoryKind kind, int32_t device) {
                std::shared_ptr<void> keep = owner.is_none() ? nullptr : holdPyObject(owner);
                MemorySpan span{reinterpret_cast<uint8_t*>(ptr), nbytes, kind, device};
                py::gil_scoped_release nogil;
                return unwrap(e.registerMemory(span, layout, std::move(keep)));
            },
            py::arg("ptr"), py::arg("nbytes"), py::arg("layout") = py::none(), py::arg("owner") = py::none(),
            py::arg("kind") = MemoryKind::kHost, py::arg("device") = -1)
        .def(
            "deregister",
            [](Engine& e, const std::shared_ptr<Region>& r) {
                Region& region = checkedRegion(r);
                py::gil_scoped_release nogil;
                check(e.deregisterMemory(region));
            },
            py::arg("region"))
        .def("descriptor",
             [](const Engine& e) {
                 Bytes d;
                 {
                     py::gil_scoped_release nogil;
                     d = e.descriptor();
                 }
                 return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
             })
        .def(
            "add_peer",
            [](Engine& e, py::bytes descriptor) {
                std::string copy = descriptor;
                py::gil_scoped_release nogil;
                return unwrap(
                    e.addPeer(ByteView(reinterpret_cast<const uint8_t*>(copy.data()), copy.size())));
            },
            py::arg("descriptor"))
        .def(
            "remove_peer",
            [](Engine& e, const std::string& name) {
                py::gil_scoped_release nogil;
                check(e.removePeer(name));
            },
            py::arg("name"))
        .def(
            "peer",
            [](const Engine& e, const std::string& name) {
                auto p = e.findPeer(name);
                if (!p) throw StatusError(Status::notFound("unknown peer '" + name + "'"));
                return p;
            },
            py::arg("name"))
        .def(
            "notify",
            [](Engine& e, const std::shared_ptr<Peer>& peer, py::bytes payload,
               std::optional<double> timeout) {
                if (!peer) throw StatusError(Status::invalidArgument("peer is None"));
                std::string data = payload;
                const auto ms = toMillis(timeout);
                py::gil_scoped_release nogil;
                check(e.notify(*peer, ByteView(reinterpret_cast<const uint8_t*>(data.data()), data.size()),
                               ms));
            },
            py::arg("peer"), py::arg("payload"), py::arg("timeout") = py::none())
        .def(
            "notifications",
            [](Engine& e, size_t max) {
                std::vector<Notification> notes;
                {
                    py::gil_scoped_release nogil;
                    notes = e.takeNotifications(max);
                }
                py::list out;
                for (auto& n : notes) {
                    // Names come from the wire: never let a bad byte sequence raise here and
                    // lose the notifications behind it.
                    py::str name = py::bytes(n.peer_name).attr("decode")("utf-8", "replace");
                    out.append(py::make_tuple(
                        name, n.peer_instance,
                        py::bytes(reinterpret_cast<const char*>(n.payload.data()), n.payload.size())));
                }
                return out;
            },
            py::arg("max") = 0)
        .def(
            "wait_notification",
            [](Engine& e, double timeout) {
                // Capped at a day per call: time points centuries away overflow (callers loop).
                const auto ms =
                    std::min<std::chrono::milliseconds>(toMillis(timeout), std::chrono::hours(24));
                py::gil_scoped_release nogil;
                return e.waitNotification(Clock::now() + ms);
            },
            py::arg("timeout"))
        .def_property_readonly("completion_fd", &Engine::completionFd)
        .def("drain_completions",
             [](Engine& e) {
                 py::gil_scoped_release nogil;
                 return e.drainCompletions();
             })
        .def("stats",
             [](const Engine& e) {
                 const EngineStats s = e.stats();
                 py::dict d;
                 d["transfers_posted"] = s.transfers_posted;
                 d["transfers_done"] = s.transfers_done;
                 d["transfers_failed"] = s.transfers_failed;
                 d["bytes_done"] = s.bytes_done;
                 d["runs_posted"] = s.runs_posted;
                 d["notifications_received"] = s.notifications_received;
                 return d;
             })
        .def("close",
             [](Engine& e) {
                 py::gil_scoped_release nogil;
                 e.close();
             })
        .def_property_readonly("closed", &Engine::closed);

    py::class_<HostBuffer, std::shared_ptr<HostBuffer>>(m, "HostBuffer", py::buffer_protocol())
        .def(py::init([](int64_t nbytes) {
                 if (nbytes <= 0) {
                     throw StatusError(Status::invalidArgument("host buffer size must be positive, got " +
                                                               std::to_string(nbytes)));
                 }
                 py::gil_scoped_release nogil;
                 return unwrap(HostBuffer::allocate(static_cast<uint64_t>(nbytes)));
             }),
             py::arg("nbytes"))
        .def_property_readonly("nbytes", &HostBuffer::size)
        .def_property_readonly("address",
                               [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
        .def_buffer([](HostBuffer& b) {
            return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                                   {static_cast<ssize_t>(b.size())}, {1});
        });

    m.def("list_backends", [] {
        py::list out;
        for (const auto& b : listBackends())
            out.append(py::make_tuple(b.name, b.available, b.reason, b.on_by_default));
        return out;
    });
}

}  // namespace kvxfer::py_bindings
