// One translator: Status -> the kvxfer.errors class for its code. Shared conversions.
#include <cmath>

#include "bindings.h"

namespace kvxfer::py_bindings {

py::object makeError(const Status& status) {
    py::module_ errors = py::module_::import("kvxfer.errors");
    return errors.attr("from_status")(statusCodeName(status.code()), status.message());
}

std::chrono::milliseconds toMillis(std::optional<double> seconds, const char* what) {
    if (!seconds) return std::chrono::milliseconds(0);
    if (std::isnan(*seconds) || *seconds <= 0) {
        throw StatusError(Status::invalidArgument(
            std::string(what) + " must be a positive number of seconds, got " + std::to_string(*seconds)));
    }
    // Saturate: anything beyond ~292 years is "no deadline in practice" (the core clamps).
    constexpr double kMaxMs = 9.2e15;
    const double ms = std::min(*seconds * 1000.0, kMaxMs);
    return std::chrono::milliseconds(std::max<int64_t>(1, static_cast<int64_t>(ms)));
}

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

void registerErrors(py::module_& m) {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const StatusError& e) {
            py::object err = makeError(e.status);
            PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
        }
    });
}

}  // namespace kvxfer::py_bindings
