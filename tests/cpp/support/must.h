// Test helper: the value of a Result, or a thrown exception carrying its status (gtest
// reports it as a failure of the test that called it).
#pragma once

#include <stdexcept>

#include "kvxfer/status.h"

namespace kvxfer::testing {

template <typename T>
T must(Result<T> r) {
    if (!r.isOk()) throw std::runtime_error(r.status().toString());
    return std::move(r).value();
}

}  // namespace kvxfer::testing
