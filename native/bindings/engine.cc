// Engine, Region, Peer, Transfer and KvLayout bindings. Block ids and extents arrive as
// numpy arrays and are read in place (no Python object per block); every call that can
// block or spin releases the GIL.
#include "kvxfer/engine.h"

#include <pybind11/chrono.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cmath>

#include "bindings.h"
#include "kvxfer/host_memory.h"

namespace kvxfer::py_bindings {
namespace {

using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using ExtentArray = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

std::chrono::milliseconds toMillis(std::optional<double> seconds) {
    if (!seconds) return std::chrono::milliseconds(0);
    if (!std::isfinite(*seconds) || *seconds <= 0) {
        throw StatusError(Status::invalidArgument("timeout must be a positive number of seconds"));
    }
    return std::chrono::milliseconds(std::max<int64_t>(1, static_cast<int64_t>(*seconds * 1000.0)));
}

// Keeps a Python object alive from C++ (a registered buffer); drops it with the GIL held.
std::shared_ptr<void> holdPyObject(py::object obj) {
    return std::shared_ptr<void>(new py::object(std::move(obj)), [](void* p) {
    // A backend thread may drop the last reference while the interpreter shuts
    // down; taking the GIL then would end the thread mid-destructor. Leak instead.
#if PY_VERSION_HEX >= 0x030D0000
        if (!Py_IsInitialized() || Py_IsFinalizing()) return;
#else
        if (!Py_IsInitialized() || _Py_IsFinalizing()) return;
#endif
        py::gil_scoped_acquire gil;
        delete static_cast<py::object*>(p);
    });
}

std::span<const int64_t> idSpan(const IdArray& a, const char* what) {
    if (a.ndim() != 1) throw StatusError(Status::invalidArgument(std::string(what) + " must be a 1-D array"));
    return {a.data(), static_cast<size_t>(a.shape(0))};
}

std::span<const Extent> extentSpan(const ExtentArray& a, const char* what) {
    if (a.ndim() != 2 || a.shape(1) != 2) {
        throw StatusError(
            Status::invalidArgument(std::string(what) + " must be an (N, 2) array of [offset, length]"));
    }
    return {reinterpret_cast<const Extent*>(a.data()), static_cast<size_t>(a.shape(0))};
}

struct SideArgs {
    std::optional<IdArray> blocks;
    std::optional<ExtentArray> extents;
    std::optional<std::pair<uint32_t, uint32_t>> layers;
};

TransferSide makeSide(const SideArgs& args, const char* which) {
    if (args.blocks && args.extents) {
        throw StatusError(Status::invalidArgument(std::string(which) + ": give blocks or extents, not both"));
    }
    if (args.blocks) {
        BlockSide b;
        b.block_ids = idSpan(*args.blocks, which);
        if (args.layers) {
            b.layer_begin = args.layers->first;
            b.layer_end = args.layers->second;
            if (b.layer_end == 0)
                throw StatusError(Status::outOfRange(std::string(which) + " layer range is empty"));
        }
        return b;
    }
    if (args.extents) return ExtentSide{extentSpan(*args.extents, which)};
    throw StatusError(Status::invalidArgument(std::string(which) + ": give blocks or extents"));
}

struct PostArgs {
    TransferRequest request;
    SideArgs local, remote;  // own the arrays the request's spans point into
};

PostArgs buildRequest(Op op, std::shared_ptr<Peer> peer, std::shared_ptr<Region> local,
                      uint32_t remote_region, std::optional<IdArray> local_blocks,
                      std::optional<IdArray> remote_blocks, std::optional<ExtentArray> local_extents,
                      std::optional<ExtentArray> remote_extents,
                      std::optional<std::pair<uint32_t, uint32_t>> layers,
                      std::optional<std::pair<uint32_t, uint32_t>> remote_layers, py::bytes notify,
                      std::optional<double> timeout, bool coalesce) {
    PostArgs a;
    a.local = {std::move(local_blocks), std::move(local_extents), layers};
    // Same block ids on both sides unless told otherwise.
    if (!remote_blocks && !remote_extents && a.local.blocks) remote_blocks = a.local.blocks;
    a.remote = {std::move(remote_blocks), std::move(remote_extents), remote_layers ? remote_layers : layers};
    TransferRequest& r = a.request;
    r.op = op;
    r.peer = std::move(peer);
    r.local = std::move(local);
    r.remote_region = remote_region;
    r.local_side = makeSide(a.local, "local");
    r.remote_side = makeSide(a.remote, "remote");
    const std::string_view payload = notify;  // a view into the bytes object: one copy
    r.notify.assign(payload.begin(), payload.end());
    r.timeout = toMillis(timeout);
    r.coalesce = coalesce;
    return a;
}

py::dict planInfo(const Plan& p) {
    py::dict d;
    d["bytes"] = p.total_bytes;
    d["pieces"] = p.num_pieces;
    d["runs"] = p.numRuns();
    d["planes"] = p.planes.size();
    d["coalescing_ratio"] = p.coalescingRatio();
    return d;
}

py::object layoutOrNone(const std::optional<KvLayout>& l) { return l ? py::cast(*l) : py::none(); }

}  // namespace

void registerEngine(py::module_& m) {
    py::enum_<Op>(m, "Op").value("WRITE", Op::kWrite).value("READ", Op::kRead);
    py::enum_<TransferState>(m, "TransferState")
        .value("PENDING", TransferState::kPending)
        .value("DONE", TransferState::kDone)
        .value("FAILED", TransferState::kFailed);

    py::class_<KvLayout>(m, "KvLayout")
        .def(py::init([](uint32_t num_layers, uint32_t num_kv, uint64_t num_blocks, uint64_t block_bytes,
                         uint64_t block_stride, uint64_t kv_stride, uint64_t layer_stride, uint64_t offset) {
                 KvLayout l{num_layers,   num_kv,    num_blocks,   block_bytes,
                            block_stride, kv_stride, layer_stride, offset};
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
        .def_property_readonly("layout", [](const Region& r) { return layoutOrNone(r.layout()); })
        .def("__repr__", [](const Region& r) {
            return "<kvxfer.Region id=" + std::to_string(r.id()) + " nbytes=" + std::to_string(r.length()) +
                   ">";
        });

    py::class_<RegionDescriptor>(m, "RemoteRegion")
        .def_readonly("id", &RegionDescriptor::id)
        .def_readonly("nbytes", &RegionDescriptor::length)
        .def_property_readonly("layout", [](const RegionDescriptor& r) { return layoutOrNone(r.layout); })
        .def("__repr__", [](const RegionDescriptor& r) {
            return "<kvxfer.RemoteRegion id=" + std::to_string(r.id) + " nbytes=" + std::to_string(r.length) +
                   ">";
        });

    py::class_<Peer, std::shared_ptr<Peer>>(m, "Peer")
        .def_property_readonly("name", &Peer::name)
        .def_property_readonly("instance_id", &Peer::instanceId)
        .def_property_readonly("backend", &Peer::backendName)
        .def_property_readonly("regions", [](const Peer& p) { return p.descriptor()->regions; })
        .def_property_readonly("removed", &Peer::removed)
        .def("__repr__",
             [](const Peer& p) { return "<kvxfer.Peer " + p.name() + " via " + p.backendName() + ">"; });

    py::class_<TransferJob, std::shared_ptr<TransferJob>>(m, "Transfer")
        .def_readonly("id", &TransferJob::id)
        .def_readonly("op", &TransferJob::op)
        .def_property_readonly("state", &TransferJob::state)
        .def("poll", &TransferJob::state, "Current state; applies the deadline (never blocks).")
        .def(
            "wait",
            [](TransferJob& j, std::optional<double> timeout) {
                TransferState s;
                {
                    py::gil_scoped_release nogil;
                    const auto until = timeout ? Clock::now() + toMillis(timeout) : Clock::time_point::max();
                    s = j.waitUntil(until);
                }
                if (s == TransferState::kFailed) throw StatusError(j.status());
                if (s == TransferState::kPending) {
                    throw StatusError(Status::timeout("wait() gave up after " + std::to_string(*timeout) +
                                                      " s; transfer " + std::to_string(j.id) +
                                                      " is still pending"));
                }
                return s;
            },
            py::arg("timeout") = py::none(),
            "Blocks until DONE (returned) or FAILED (raises its error). Without a timeout it waits at most "
            "until the transfer's own deadline.")
        .def("cancel", [](TransferJob& j) { return j.abandon(Status::canceled("canceled by the caller")); })
        .def_property_readonly("error",
                               [](const TransferJob& j) -> py::object {
                                   const Status st = j.status();
                                   return st.isOk() ? py::none() : makeError(st);
                               })
        .def_property_readonly("quiesced", &TransferJob::quiesced,
                               "True once the backend no longer touches the transfer's memory.")
        .def_property_readonly("bytes", [](const TransferJob& j) { return j.plan->total_bytes; })
        .def_property_readonly("plan", [](const TransferJob& j) { return planInfo(*j.plan); })
        .def("__repr__", [](TransferJob& j) {
            static const char* names[] = {"PENDING", "DONE", "FAILED"};
            return "<kvxfer.Transfer " + std::to_string(j.id) + " " + opName(j.op) + " " +
                   names[static_cast<int>(j.state())] + ">";
        });

    py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
        .def(
            py::init([](const std::string& name, std::optional<std::vector<std::string>> backends,
                        unsigned threads, const std::string& device, double timeout, double connect_timeout) {
                EngineConfig c;
                c.name = name;
                if (backends) c.backends = *backends;
                c.threads = threads;
                c.device = device;
                c.default_timeout = toMillis(timeout);
                c.connect_timeout = toMillis(connect_timeout);
                return unwrap(Engine::create(c));
            }),
            py::arg("name"), py::kw_only(), py::arg("backends") = py::none(), py::arg("threads") = 0,
            py::arg("device") = "", py::arg("timeout") = 30.0, py::arg("connect_timeout") = 10.0)
        .def_property_readonly("name", &Engine::name)
        .def_property_readonly("instance_id", &Engine::instanceId)
        .def_property_readonly("backends", &Engine::backendNames)
        .def("describe_backends", &Engine::describeBackends)
        .def(
            "register_ptr",
            [](Engine& e, uintptr_t ptr, uint64_t nbytes, std::optional<KvLayout> layout, py::object owner) {
                std::shared_ptr<void> keep = owner.is_none() ? nullptr : holdPyObject(owner);
                py::gil_scoped_release nogil;
                return unwrap(
                    e.registerMemory(reinterpret_cast<void*>(ptr), nbytes, layout, std::move(keep)));
            },
            py::arg("ptr"), py::arg("nbytes"), py::arg("layout") = py::none(), py::arg("owner") = py::none())
        .def(
            "register_buffer",
            [](Engine& e, py::buffer obj, std::optional<KvLayout> layout) {
                py::buffer_info info = obj.request(true);
                // Only a C-contiguous buffer is one byte range.
                ssize_t expect = info.itemsize;
                for (ssize_t d = info.ndim - 1; d >= 0; --d) {
                    if (info.shape[d] > 1 && info.strides[d] != expect) {
                        throw StatusError(Status::invalidArgument("buffer is not C-contiguous"));
                    }
                    expect *= info.shape[d];
                }
                const uint64_t nbytes = static_cast<uint64_t>(info.size * info.itemsize);
                auto keep = holdPyObject(obj);
                py::gil_scoped_release nogil;
                return unwrap(e.registerMemory(info.ptr, nbytes, layout, std::move(keep)));
            },
            py::arg("buffer"), py::arg("layout") = py::none())
        .def("deregister", [](Engine& e, const Region& r) { check(e.deregisterMemory(r)); })
        .def("descriptor",
             [](const Engine& e) {
                 const Bytes d = e.descriptor();
                 return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
             })
        .def(
            "add_peer",
            [](Engine& e, py::bytes descriptor) {
                std::string_view view = descriptor;
                std::string copy(view);
                py::gil_scoped_release nogil;
                return unwrap(
                    e.addPeer(ByteView(reinterpret_cast<const uint8_t*>(copy.data()), copy.size())));
            },
            py::arg("descriptor"))
        .def(
            "remove_peer", [](Engine& e, const std::string& name) { check(e.removePeer(name)); },
            py::arg("name"))
        .def("peer",
             [](const Engine& e, const std::string& name) {
                 auto p = e.findPeer(name);
                 if (!p) throw StatusError(Status::notFound("unknown peer '" + name + "'"));
                 return p;
             })
        .def(
            "post",
            [](Engine& e, Op op, std::shared_ptr<Peer> peer, std::shared_ptr<Region> local,
               uint32_t remote_region, std::optional<IdArray> local_blocks,
               std::optional<IdArray> remote_blocks, std::optional<ExtentArray> local_extents,
               std::optional<ExtentArray> remote_extents, std::optional<std::pair<uint32_t, uint32_t>> layers,
               std::optional<std::pair<uint32_t, uint32_t>> remote_layers, py::bytes notify,
               std::optional<double> timeout, bool coalesce) {
                PostArgs a =
                    buildRequest(op, std::move(peer), std::move(local), remote_region,
                                 std::move(local_blocks), std::move(remote_blocks), std::move(local_extents),
                                 std::move(remote_extents), layers, remote_layers, notify, timeout, coalesce);
                py::gil_scoped_release nogil;
                return unwrap(e.post(a.request));
            },
            py::arg("op"), py::arg("peer"), py::arg("local"), py::arg("remote_region"), py::kw_only(),
            py::arg("local_blocks") = py::none(), py::arg("remote_blocks") = py::none(),
            py::arg("local_extents") = py::none(), py::arg("remote_extents") = py::none(),
            py::arg("layers") = py::none(), py::arg("remote_layers") = py::none(),
            py::arg("notify") = py::bytes(""), py::arg("timeout") = py::none(), py::arg("coalesce") = true)
        .def(
            "plan",
            [](const Engine& e, Op op, std::shared_ptr<Peer> peer, std::shared_ptr<Region> local,
               uint32_t remote_region, std::optional<IdArray> local_blocks,
               std::optional<IdArray> remote_blocks, std::optional<ExtentArray> local_extents,
               std::optional<ExtentArray> remote_extents, std::optional<std::pair<uint32_t, uint32_t>> layers,
               std::optional<std::pair<uint32_t, uint32_t>> remote_layers, bool coalesce) {
                PostArgs a = buildRequest(op, std::move(peer), std::move(local), remote_region,
                                          std::move(local_blocks), std::move(remote_blocks),
                                          std::move(local_extents), std::move(remote_extents), layers,
                                          remote_layers, py::bytes(""), std::nullopt, coalesce);
                std::shared_ptr<const Plan> plan;
                {
                    py::gil_scoped_release nogil;
                    plan = unwrap(e.plan(a.request));
                }
                return planInfo(*plan);
            },
            py::arg("op"), py::arg("peer"), py::arg("local"), py::arg("remote_region"), py::kw_only(),
            py::arg("local_blocks") = py::none(), py::arg("remote_blocks") = py::none(),
            py::arg("local_extents") = py::none(), py::arg("remote_extents") = py::none(),
            py::arg("layers") = py::none(), py::arg("remote_layers") = py::none(), py::arg("coalesce") = true)
        .def(
            "notify",
            [](Engine& e, Peer& peer, py::bytes payload, std::optional<double> timeout) {
                std::string data = payload;
                py::gil_scoped_release nogil;
                check(e.notify(peer, ByteView(reinterpret_cast<const uint8_t*>(data.data()), data.size()),
                               toMillis(timeout)));
            },
            py::arg("peer"), py::arg("payload"), py::arg("timeout") = py::none())
        .def(
            "notifications",
            [](Engine& e, size_t max) {
                py::list out;
                for (auto& n : e.takeNotifications(max)) {
                    out.append(py::make_tuple(
                        n.peer_name, n.peer_instance,
                        py::bytes(reinterpret_cast<const char*>(n.payload.data()), n.payload.size())));
                }
                return out;
            },
            py::arg("max") = 0)
        .def(
            "wait_notification",
            [](Engine& e, double timeout) {
                py::gil_scoped_release nogil;
                return e.waitNotification(Clock::now() + toMillis(timeout));
            },
            py::arg("timeout"))
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
        .def(py::init([](uint64_t nbytes) {
                 py::gil_scoped_release nogil;
                 return unwrap(HostBuffer::allocate(nbytes));
             }),
             py::arg("nbytes"))
        .def_property_readonly("nbytes", &HostBuffer::size)
        .def_property_readonly("address",
                               [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
        .def_buffer([](HostBuffer& b) {
            return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                                   {static_cast<ssize_t>(b.size())}, {1});
        });

    // Descriptor codec, for tooling and for tests whose peer is not a kvxfer engine.
    m.def("decode_descriptor", [](py::bytes blob) {
        std::string data = blob;
        PeerDescriptor d =
            unwrap(decodeDescriptor(ByteView(reinterpret_cast<const uint8_t*>(data.data()), data.size())));
        py::dict out;
        out["engine_name"] = d.engine_name;
        out["instance_id"] = d.instance_id;
        out["host_id"] = d.host_id;
        out["pid"] = d.pid;
        py::list backends;
        for (const auto& b : d.backends) {
            backends.append(py::make_tuple(
                b.name, py::bytes(reinterpret_cast<const char*>(b.info.data()), b.info.size())));
        }
        out["backends"] = backends;
        py::list regions;
        for (const auto& r : d.regions) {
            py::dict rd;
            rd["id"] = r.id;
            rd["base_address"] = r.base_address;
            rd["length"] = r.length;
            rd["layout"] = layoutOrNone(r.layout);
            py::list keys;
            for (const auto& k : r.remote_keys)
                keys.append(py::bytes(reinterpret_cast<const char*>(k.data()), k.size()));
            rd["remote_keys"] = keys;
            regions.append(rd);
        }
        out["regions"] = regions;
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
            for (auto k : rd["remote_keys"]) {
                std::string key = k.cast<py::bytes>();
                r.remote_keys.emplace_back(key.begin(), key.end());
            }
            desc.regions.push_back(std::move(r));
        }
        const Bytes out = encodeDescriptor(desc);
        return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
    });

    m.def("list_backends", [] {
        py::list out;
        for (const auto& b : listBackends())
            out.append(py::make_tuple(b.name, b.available, b.reason, b.on_by_default));
        return out;
    });
}

}  // namespace kvxfer::py_bindings
