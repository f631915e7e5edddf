#include "bindings.h"

PYBIND11_MODULE(_native, m) {
    m.doc() = "kvxfer native core (use the kvxfer package, not this module)";
    kvxfer::py_bindings::registerErrors(m);
    kvxfer::py_bindings::registerConfig(m);
    kvxfer::py_bindings::registerEngine(m);
    kvxfer::py_bindings::registerTransfer(m);
    kvxfer::py_bindings::registerDescriptor(m);
    kvxfer::py_bindings::registerGpu(m);
}
