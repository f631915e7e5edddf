// Bindings of kvxfer/gpu.h: CUDA status, pointer device, copy plans.
#include "kvxfer/gpu.h"

#include <pybind11/numpy.h>

#include <vector>

#include "bindings.h"

namespace kvxfer::py_bindings {

void registerGpu(py::module_& m) {
    m.def(
        "cuda_status", [] { return cudaStatus().message(); },
        "'' when the CUDA driver loads and sees a GPU, else why not");
    m.def(
        "cuda_pointer_device", [](uintptr_t ptr) { return unwrap(cudaPointerDevice(ptr)); }, py::arg("ptr"));
    py::class_<GpuCopyPlan, std::shared_ptr<GpuCopyPlan>>(m, "GpuCopyPlan")
        .def(py::init([](int device, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> runs) {
                 if (runs.ndim() != 2 || runs.shape(1) != 3) {
                     throw StatusError(
                         Status::invalidArgument("runs must be an (N, 3) array of [src, dst, length]"));
                 }
                 const auto n = static_cast<size_t>(runs.shape(0));
                 std::vector<GpuRun> table(n);
                 const uint64_t* p = runs.data();
                 for (size_t i = 0; i < n; ++i) table[i] = {p[3 * i], p[3 * i + 1], p[3 * i + 2]};
                 py::gil_scoped_release nogil;
                 return unwrap(makeGpuCopyPlan(device, table));
             }),
             py::arg("device"), py::arg("runs"))
        .def(
            "launch",
            [](const GpuCopyPlan& p, uintptr_t src, uint64_t src_bytes, uintptr_t dst, uint64_t dst_bytes,
               bool swap, uintptr_t stream) {
                py::gil_scoped_release nogil;
                check(p.launch(src, src_bytes, dst, dst_bytes, swap, stream));
            },
            py::arg("src"), py::arg("src_bytes"), py::arg("dst"), py::arg("dst_bytes"),
            py::arg("swap") = false, py::arg("stream") = 0)
        .def_property_readonly("device", &GpuCopyPlan::device)
        .def_property_readonly("bytes", &GpuCopyPlan::bytes)
        .def_property_readonly("runs", &GpuCopyPlan::runs)
        .def_property_readonly("kernel_entries", &GpuCopyPlan::kernelEntries);
}

}  // namespace kvxfer::py_bindings
