// Transfers: posting (one part, or many parts across regions), planning, and the Transfer
// handle. Block ids and extents arrive as numpy arrays and are read in place (no Python
// object per block); parts that pass the same array object share one plan in the core.
#include "kvxfer/transfer.h"

#include <pybind11/chrono.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "kvxfer/engine.h"

namespace kvxfer::py_bindings {
namespace {

using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using ExtentArray = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

// Checks that `a` holds integers (fractions are not ids or byte positions) and converts it
// to the 64-bit array type T in place when it already is one (no copy) or by a cast.
template <typename T>
T integerArray(const py::array& a, const char* what, const char* as) {
    const char kind = a.dtype().kind();
    if (a.size() > 0 && kind != 'i' && kind != 'u') {
        throw StatusError(Status::invalidArgument(std::string(what) + " must be integers, got dtype " +
                                                  std::string(py::str(a.dtype()))));
    }
    auto out = T::ensure(a);
    if (!out) {
        PyErr_Clear();
        throw StatusError(Status::invalidArgument(std::string(what) + " cannot be read as " + as));
    }
    return out;
}

IdArray asIds(const py::object& obj, const char* what) {
    auto a = py::array::ensure(obj);
    if (!a) throw StatusError(Status::invalidArgument(std::string(what) + " must be an integer array"));
    return integerArray<IdArray>(a, what, "64-bit block ids");
}

ExtentArray asExtents(const py::object& obj, const char* what) {
    auto a = py::array::ensure(obj);
    if (!a)
        throw StatusError(Status::invalidArgument(std::string(what) + " must be an (N, 2) integer array"));
    if (!(a.ndim() == 2 && a.shape(1) == 2) && !(a.ndim() == 1 && a.shape(0) == 2)) {
        throw StatusError(
            Status::invalidArgument(std::string(what) + " must be an (N, 2) array of [offset, length]"));
    }
    if (a.size() > 0 && a.dtype().kind() == 'i' && a.attr("__lt__")(0).attr("any")().cast<bool>()) {
        throw StatusError(
            Status::invalidArgument(std::string(what) + " contains a negative offset or length"));
    }
    return integerArray<ExtentArray>(a, what, "64-bit [offset, length] extents");
}

std::span<const int64_t> idSpan(const IdArray& a, const char* what) {
    if (a.ndim() != 1) throw StatusError(Status::invalidArgument(std::string(what) + " must be a 1-D array"));
    return {a.data(), static_cast<size_t>(a.shape(0))};
}

std::span<const Extent> extentSpan(const ExtentArray& a, const char* what) {
    if (a.ndim() == 1 && a.shape(0) == 2) {
        return {reinterpret_cast<const Extent*>(a.data()), 1};
    }
    if (a.ndim() != 2 || a.shape(1) != 2) {
        throw StatusError(
            Status::invalidArgument(std::string(what) + " must be an (N, 2) array of [offset, length]"));
    }
    return {reinterpret_cast<const Extent*>(a.data()), static_cast<size_t>(a.shape(0))};
}

std::optional<std::pair<uint32_t, uint32_t>> layerRange(const py::object& obj, const char* what) {
    if (obj.is_none()) return std::nullopt;
    auto t = obj.cast<py::sequence>();
    if (py::len(t) != 2)
        throw StatusError(Status::invalidArgument(std::string(what) + " must be (begin, end)"));
    const int64_t b = t[0].cast<int64_t>(), e = t[1].cast<int64_t>();
    if (b < 0 || e < 0 || b > UINT32_MAX || e > UINT32_MAX) {
        throw StatusError(Status::outOfRange(std::string(what) + " (" + std::to_string(b) + ", " +
                                             std::to_string(e) + ") is outside 0..2**32-1"));
    }
    if (e == 0 || e <= b) {
        throw StatusError(Status::outOfRange(std::string(what) + " (" + std::to_string(b) + ", " +
                                             std::to_string(e) + ") is empty"));
    }
    return std::make_pair(static_cast<uint32_t>(b), static_cast<uint32_t>(e));
}

uint32_t regionId(const py::object& obj) {
    const int64_t v = obj.cast<int64_t>();
    if (v < 0 || v > UINT32_MAX) {
        throw StatusError(Status::notFound("remote region id " + std::to_string(v) + " is not a region id"));
    }
    return static_cast<uint32_t>(v);
}

// A short Python list or tuple of exact ints read straight into `out` (no numpy array):
// the small-request path. False when it is anything else (the array path then converts
// it, with its own errors).
bool smallIdList(const py::handle& obj, std::vector<int64_t>& out) {
    PyObject* o = obj.ptr();
    if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    if (n == 0 || n > 1024) return false;
    PyObject** items = PySequence_Fast_ITEMS(o);
    out.resize(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        if (!PyLong_CheckExact(items[i])) return false;
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(items[i], &overflow);
        if (overflow != 0) return false;
        out[static_cast<size_t>(i)] = v;
    }
    return true;
}

bool exactU64(PyObject* item, uint64_t* v) {
    if (!PyLong_CheckExact(item)) return false;
    *v = PyLong_AsUnsignedLongLong(item);  // negative or above 2**64-1: error
    if (*v == static_cast<uint64_t>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
    }
    return true;
}

// [offset, length] or a short list/tuple of them, of exact non-negative ints, read
// straight into `out`. False: anything else (the array path decides).
bool smallExtentList(const py::handle& obj, std::vector<Extent>& out) {
    PyObject* o = obj.ptr();
    if (!PyList_Check(o) && !PyTuple_Check(o)) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    if (n == 0 || n > 1024) return false;
    PyObject** items = PySequence_Fast_ITEMS(o);
    if (n == 2 && PyLong_CheckExact(items[0])) {  // one extent, flat
        Extent e{};
        if (!exactU64(items[0], &e.offset) || !exactU64(items[1], &e.length)) return false;
        out.assign(1, e);
        return true;
    }
    out.resize(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* pair = items[i];
        if ((!PyList_Check(pair) && !PyTuple_Check(pair)) || PySequence_Fast_GET_SIZE(pair) != 2)
            return false;
        PyObject** two = PySequence_Fast_ITEMS(pair);
        if (!exactU64(two[0], &out[static_cast<size_t>(i)].offset) ||
            !exactU64(two[1], &out[static_cast<size_t>(i)].length))
            return false;
    }
    return true;
}

// Owns what a request's spans point into: numpy arrays, or vectors read from short
// lists. Deduplicated by object so parts passing the same object share a span (and so one
// plan). Vectors, not deques: a deque allocates even when empty, and moving a vector of
// arrays or vectors keeps the data its spans point to in place.
struct Holder {
    std::vector<IdArray> ids;
    std::vector<ExtentArray> extents;
    std::vector<std::vector<int64_t>> id_lists;
    std::vector<std::vector<Extent>> extent_lists;
    std::vector<std::pair<PyObject*, std::span<const int64_t>>> id_index;
    std::vector<std::pair<PyObject*, std::span<const Extent>>> extent_index;

    std::span<const int64_t> ids_of(const py::object& obj, const char* what) {
        for (auto& [p, span] : id_index) {
            if (p == obj.ptr()) return span;
        }
        std::vector<int64_t> list;
        std::span<const int64_t> span;
        if (smallIdList(obj, list)) {
            id_lists.push_back(std::move(list));
            span = {id_lists.back().data(), id_lists.back().size()};
        } else {
            ids.push_back(asIds(obj, what));
            span = idSpan(ids.back(), what);
        }
        id_index.emplace_back(obj.ptr(), span);
        return span;
    }
    std::span<const Extent> extents_of(const py::object& obj, const char* what) {
        for (auto& [p, span] : extent_index) {
            if (p == obj.ptr()) return span;
        }
        std::vector<Extent> list;
        std::span<const Extent> span;
        if (smallExtentList(obj, list)) {
            extent_lists.push_back(std::move(list));
            span = {extent_lists.back().data(), extent_lists.back().size()};
        } else {
            extents.push_back(asExtents(obj, what));
            span = extentSpan(extents.back(), what);
        }
        extent_index.emplace_back(obj.ptr(), span);
        return span;
    }
};

TransferSide makeSide(Holder& h, const py::object& blocks, const py::object& extents,
                      const py::object& layers, const char* which) {
    const bool has_blocks = !blocks.is_none(), has_extents = !extents.is_none();
    if (has_blocks && has_extents) {
        throw StatusError(Status::invalidArgument(std::string(which) + ": give blocks or extents, not both"));
    }
    if (has_blocks) {
        BlockSide b;
        b.block_ids = h.ids_of(blocks, which);
        if (auto r = layerRange(layers, which)) {
            b.layer_begin = r->first;
            b.layer_end = r->second;
        }
        return b;
    }
    if (has_extents) return ExtentSide{h.extents_of(extents, which)};
    throw StatusError(Status::invalidArgument(std::string(which) + ": give blocks or extents"));
}

// A part from Python: (local Region, remote region id, local_blocks, remote_blocks,
// local_extents, remote_extents, layers, remote_layers); the remote side defaults to the
// local block ids and the local layer range.
TransferPart makePart(Holder& h, const py::handle& item) {
    auto t = item.cast<py::tuple>();
    if (py::len(t) != 8) throw StatusError(Status::internal("a part is an 8-tuple"));
    TransferPart p;
    p.local = t[0].cast<std::shared_ptr<Region>>();
    if (!p.local) throw StatusError(Status::invalidArgument("local region is None"));
    p.remote_region = regionId(t[1]);
    py::object local_blocks = t[2], remote_blocks = t[3], local_extents = t[4], remote_extents = t[5];
    py::object layers = t[6], remote_layers = t[7];
    if (remote_blocks.is_none() && remote_extents.is_none() && !local_blocks.is_none())
        remote_blocks = local_blocks;
    if (remote_layers.is_none()) remote_layers = layers;
    p.local_side = makeSide(h, local_blocks, local_extents, layers, "local");
    p.remote_side = makeSide(h, remote_blocks, remote_extents, remote_layers, "remote");
    return p;
}

TransferRequest makeRequest(Holder& h, Op op, const std::shared_ptr<Peer>& peer, const py::sequence& parts,
                            const py::bytes& notify, std::optional<double> timeout, bool coalesce) {
    if (!peer) throw StatusError(Status::invalidArgument("peer is None"));
    TransferRequest r;
    r.op = op;
    r.peer = peer;
    r.parts.reserve(py::len(parts));
    for (const auto& item : parts) r.parts.push_back(makePart(h, item));
    const std::string_view payload = notify;
    r.notify.assign(payload.begin(), payload.end());
    r.timeout = toMillis(timeout);
    r.coalesce = coalesce;
    return r;
}

py::dict planDict(const PlanSummary& p) {
    py::dict d;
    d["bytes"] = p.bytes;
    d["pieces"] = p.pieces;
    d["runs"] = p.runs;
    d["planes"] = p.planes;
    d["parts"] = p.parts;
    d["coalescing_ratio"] = p.coalescingRatio();
    return d;
}

double secondsSince(Clock::time_point from, Clock::time_point to) {
    if (from == Clock::time_point{} || to == Clock::time_point{}) return -1.0;
    return std::chrono::duration<double>(to - from).count();
}

}  // namespace

void registerTransfer(py::module_& m) {
    py::enum_<Op>(m, "Op").value("WRITE", Op::kWrite).value("READ", Op::kRead);
    py::enum_<TransferState>(m, "TransferState")
        .value("PENDING", TransferState::kPending)
        .value("DONE", TransferState::kDone)
        .value("FAILED", TransferState::kFailed);

    py::class_<Transfer>(m, "Transfer")
        .def_property_readonly("id", &Transfer::id)
        .def_property_readonly("op", &Transfer::op)
        .def_property_readonly("state", &Transfer::state)
        .def("poll", &Transfer::state, "Current state; applies the deadline (never blocks).")
        .def(
            "wait",
            [](const Transfer& t, std::optional<double> timeout) {
                const auto ms = toMillis(timeout, "wait timeout");
                // Finished already (the inline path): answer without releasing the GIL. (The
                // job's own state: wait() below lets the backend drive it, without the GIL.)
                TransferState s;
                if (t.job()->terminal()) {
                    s = t.job()->state();
                } else {
                    py::gil_scoped_release nogil;
                    auto until = Clock::time_point::max();  // no clock read without a timeout
                    if (timeout) {
                        const auto now = Clock::now();
                        // In milliseconds: comparing in nanoseconds would overflow for ~300 years.
                        const auto room = std::chrono::duration_cast<std::chrono::milliseconds>(
                            Clock::time_point::max() - now);
                        if (ms < room) until = now + ms;
                    }
                    s = t.wait(until);  // applies the deadline (a pending job past it fails here)
                }
                if (s == TransferState::kFailed) throw StatusError(t.status());
                if (s == TransferState::kPending) {
                    // Only a caller's own timeout can end a wait early: the transfer's
                    // deadline always makes it terminal first.
                    throw StatusError(Status::timeout("wait() gave up after its own timeout of " +
                                                      std::to_string(*timeout) + " s; transfer " +
                                                      std::to_string(t.id()) +
                                                      " is still pending (its deadline has not passed)"));
                }
                return s;
            },
            py::arg("timeout") = py::none(),
            "Blocks until DONE (returned) or FAILED (raises its error). Without a timeout it waits until "
            "the transfer ends, which its deadline bounds.")
        .def("cancel",
             [](const Transfer& t) {
                 py::gil_scoped_release nogil;
                 return t.cancel();
             })
        .def_property_readonly("error",
                               [](const Transfer& t) -> py::object {
                                   const Status st = t.status();
                                   return st.isOk() ? py::none() : makeError(st);
                               })
        .def_property_readonly("quiesced", &Transfer::quiesced,
                               "True once no backend touches the transfer's memory any more.")
        .def_property_readonly("bytes", [](const Transfer& t) { return t.job()->total_bytes; })
        .def_property_readonly("plan", [](const Transfer& t) { return planDict(t.plan()); })
        .def_property_readonly("telemetry",
                               [](const Transfer& t) {
                                   const TransferTelemetry x = t.telemetry();
                                   py::dict d;
                                   d["bytes"] = x.bytes;
                                   d["runs"] = x.runs;
                                   d["pieces"] = x.pieces;
                                   d["parts"] = x.parts;
                                   d["post_cpu_us"] = x.post_cpu_us;
                                   d["data_s"] = secondsSince(x.posted, x.data_done);
                                   d["total_s"] = secondsSince(x.posted, x.finished);
                                   return d;
                               })
        .def("__repr__", [](const Transfer& t) {
            static const char* names[] = {"PENDING", "DONE", "FAILED"};
            return "<kvxfer.Transfer " + std::to_string(t.id()) + " " + opName(t.op()) + " " +
                   names[static_cast<int>(t.state())] + ">";
        });

    m.def(
        "post",
        [](Engine& e, Op op, const std::shared_ptr<Peer>& peer, const py::sequence& parts, py::bytes notify,
           std::optional<double> timeout, bool coalesce) {
            Holder h;
            TransferRequest r = makeRequest(h, op, peer, parts, notify, timeout, coalesce);
            py::gil_scoped_release nogil;
            return unwrap(e.post(r));
        },
        py::arg("engine"), py::arg("op"), py::arg("peer"), py::arg("parts"),
        py::arg("notify") = py::bytes(""), py::arg("timeout") = py::none(), py::arg("coalesce") = true,
        "Posts one transfer of any number of parts (see kvxfer.Engine.post).");
    m.def(
        "post_extent",
        [](Engine& e, Op op, const std::shared_ptr<Peer>& peer, const std::shared_ptr<Region>& local,
           int64_t remote_region, int64_t local_offset, int64_t remote_offset, int64_t nbytes,
           const py::bytes& notify, std::optional<double> timeout) {
            if (!peer) throw StatusError(Status::invalidArgument("peer is None"));
            if (!local) throw StatusError(Status::invalidArgument("local region is None"));
            if (remote_region < 0 || remote_region > UINT32_MAX) {
                throw StatusError(Status::notFound("remote region id " + std::to_string(remote_region) +
                                                   " is not a region id"));
            }
            if (local_offset < 0 || remote_offset < 0 || nbytes < 0) {
                throw StatusError(Status::invalidArgument(
                    "offsets and length must be >= 0, got " + std::to_string(local_offset) + ", " +
                    std::to_string(remote_offset) + ", " + std::to_string(nbytes)));
            }
            const Extent le{static_cast<uint64_t>(local_offset), static_cast<uint64_t>(nbytes)};
            const Extent re{static_cast<uint64_t>(remote_offset), static_cast<uint64_t>(nbytes)};
            TransferRequest r;
            r.op = op;
            r.peer = peer;
            r.parts.push_back(
                {local, ExtentSide{{&le, 1}}, static_cast<uint32_t>(remote_region), ExtentSide{{&re, 1}}});
            const std::string_view payload = notify;
            r.notify.assign(payload.begin(), payload.end());
            r.timeout = toMillis(timeout);
            py::gil_scoped_release nogil;
            return unwrap(e.post(r));
        },
        py::arg("engine"), py::arg("op"), py::arg("peer"), py::arg("local"), py::arg("remote_region"),
        py::arg("local_offset"), py::arg("remote_offset"), py::arg("nbytes"),
        py::arg("notify") = py::bytes(""), py::arg("timeout") = py::none(),
        "Posts one transfer of one extent (the small-request path; see kvxfer.Engine.post_extent).");
    m.def(
        "poll_many",
        [](const py::sequence& transfers) {
            const Py_ssize_t n = py::len(transfers);
            py::list out(n);
            for (Py_ssize_t i = 0; i < n; ++i) {
                py::handle item = transfers[i];
                if (py::hasattr(item, "_t")) item = item.attr("_t");
                out[i] = py::cast(item.cast<const Transfer&>().state());
            }
            return out;
        },
        py::arg("transfers"), "The states of many transfers in one call (never blocks).");
    m.def(
        "plan",
        [](const Engine& e, Op op, const std::shared_ptr<Peer>& peer, const py::sequence& parts,
           bool coalesce) {
            Holder h;
            TransferRequest r = makeRequest(h, op, peer, parts, py::bytes(""), std::nullopt, coalesce);
            PlanSummary s;
            {
                py::gil_scoped_release nogil;
                s = unwrap(e.plan(r));
            }
            return planDict(s);
        },
        py::arg("engine"), py::arg("op"), py::arg("peer"), py::arg("parts"), py::arg("coalesce") = true);
    m.def(
        "watch", [](Engine& e, const Transfer& t) { e.watch(t); }, py::arg("engine"), py::arg("transfer"),
        "Reports the transfer's end on the engine's completion fd.");
}

}  // namespace kvxfer::py_bindings
