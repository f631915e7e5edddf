// EngineConfig and its per-backend sections. kvxfer/config.py mirrors them as dataclasses
// and converts with to_native(); these classes are not used directly.
#include "kvxfer/config.h"

#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include "bindings.h"

namespace kvxfer::py_bindings {

void registerConfig(py::module_& m) {
    py::class_<LoopbackConfig>(m, "LoopbackConfig")
        .def(py::init<>())
        .def_readwrite("threads", &LoopbackConfig::threads)
        .def_readwrite("inline_max_bytes", &LoopbackConfig::inline_max_bytes);
    py::class_<FaultConfig>(m, "FaultConfig").def(py::init<>()).def_readwrite("script", &FaultConfig::script);
    py::class_<ShmConfig>(m, "ShmConfig")
        .def(py::init<>())
        .def_readwrite("threads", &ShmConfig::threads)
        .def_readwrite("inline_max_bytes", &ShmConfig::inline_max_bytes);
    py::class_<TcpConfig>(m, "TcpConfig")
        .def(py::init<>())
        .def_readwrite("listen", &TcpConfig::listen)
        .def_readwrite("inline_max_bytes", &TcpConfig::inline_max_bytes)
        .def_readwrite("spin_us", &TcpConfig::spin_us);
    py::class_<IbverbsConfig>(m, "IbverbsConfig")
        .def(py::init<>())
        .def_readwrite("device", &IbverbsConfig::device)
        .def_readwrite("gid_index", &IbverbsConfig::gid_index)
        .def_readwrite("port_num", &IbverbsConfig::port_num)
        .def_readwrite("qps_per_peer", &IbverbsConfig::qps_per_peer)
        .def_readwrite("sq_depth", &IbverbsConfig::sq_depth)
        .def_readwrite("recv_buffers", &IbverbsConfig::recv_buffers)
        .def_readwrite("max_wr_bytes", &IbverbsConfig::max_wr_bytes)
        .def_readwrite("ack_timeout", &IbverbsConfig::ack_timeout)
        .def_readwrite("retry_cnt", &IbverbsConfig::retry_cnt)
        .def_readwrite("rnr_retry", &IbverbsConfig::rnr_retry)
        .def_readwrite("traffic_class", &IbverbsConfig::traffic_class)
        .def_readwrite("service_level", &IbverbsConfig::service_level)
        .def_readwrite("spin_us", &IbverbsConfig::spin_us)
        .def_readwrite("debug", &IbverbsConfig::debug);
    py::class_<BackendConfigs>(m, "BackendConfigs")
        .def(py::init<>())
        .def_readwrite("loopback", &BackendConfigs::loopback)
        .def_readwrite("fault", &BackendConfigs::fault)
        .def_readwrite("shm", &BackendConfigs::shm)
        .def_readwrite("tcp", &BackendConfigs::tcp)
        .def_readwrite("ibverbs", &BackendConfigs::ibverbs);
    py::class_<EngineConfig>(m, "EngineConfig")
        .def(py::init<>())
        .def_readwrite("name", &EngineConfig::name)
        .def_readwrite("backends", &EngineConfig::backends)
        .def_readwrite("default_timeout", &EngineConfig::default_timeout)
        .def_readwrite("connect_timeout", &EngineConfig::connect_timeout)
        .def_readwrite("backend", &EngineConfig::backend);
    m.def("environment_variables", &environmentVariables,
          "Every KVXFER_* variable of the configuration overlay, with the field it sets.");
}

}  // namespace kvxfer::py_bindings
