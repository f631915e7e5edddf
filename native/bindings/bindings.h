// Shared declarations of the pybind11 binding files. Bindings convert types, release
// the GIL around anything that can block, and turn Status into typed exceptions; they
// hold no policy.
#pragma once

#include <pybind11/pybind11.h>

#include <chrono>
#include <memory>
#include <optional>

#include "kvxfer/status.h"

namespace kvxfer::py_bindings {

namespace py = pybind11;

// Thrown by unwrap(); translated into a kvxfer.errors class chosen by the status code.
struct StatusError : std::exception {
    Status status;
    explicit StatusError(Status s) : status(std::move(s)) {}
    const char* what() const noexcept override { return status.message().c_str(); }
};

inline void check(Status st) {
    if (!st.isOk()) throw StatusError(std::move(st));
}
template <typename T>
T unwrap(Result<T> r) {
    if (!r.isOk()) throw StatusError(r.status());
    return std::move(r).value();
}

// Builds the kvxfer.errors exception instance for a status (GIL held).
py::object makeError(const Status& status);

// Seconds (None = 0 = "use the default") to milliseconds; rejects negative, NaN and
// infinite values with kInvalidArgument, saturates huge ones.
std::chrono::milliseconds toMillis(std::optional<double> seconds, const char* what = "timeout");
// Keeps a Python object alive from C++ (a registered buffer); drops it with the GIL held.
std::shared_ptr<void> holdPyObject(py::object obj);

void registerErrors(py::module_& m);
void registerConfig(py::module_& m);
void registerEngine(py::module_& m);
void registerTransfer(py::module_& m);
void registerDescriptor(py::module_& m);
void registerGpu(py::module_& m);

}  // namespace kvxfer::py_bindings
