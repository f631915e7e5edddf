// One translator: Status -> the kvxfer.errors class for its code.
#include "bindings.h"

namespace kvxfer::py_bindings {

py::object makeError(const Status& status) {
    py::module_ errors = py::module_::import("kvxfer.errors");
    return errors.attr("from_status")(statusCodeName(status.code()), status.message());
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
