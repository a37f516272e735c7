"""Unit conversion, as an example of a YAML `python:` tool (see tools/custom_tools.yaml)."""

from __future__ import annotations

from tools.registry import ToolError

# factor to the base unit of each dimension: metre, kilogram, second, litre
_FACTORS = {
    "length": {"mm": 0.001, "cm": 0.01, "m": 1.0, "km": 1000.0, "in": 0.0254, "ft": 0.3048, "mi": 1609.344},
    "mass": {"g": 0.001, "kg": 1.0, "lb": 0.45359237, "oz": 0.028349523125},
    "time": {"s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0},
    "volume": {"ml": 0.001, "l": 1.0, "gal": 3.785411784},
}
_TEMPERATURE = {"C", "F", "K"}


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, object]:
    """Convert `value` between units of the same dimension (length, mass, time, volume, temperature)."""
    if from_unit in _TEMPERATURE and to_unit in _TEMPERATURE:
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        result = {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
        return {"value": round(result, 6), "unit": to_unit}
    for factors in _FACTORS.values():
        if from_unit in factors and to_unit in factors:
            return {"value": round(value * factors[from_unit] / factors[to_unit], 9), "unit": to_unit}
    known = sorted(_TEMPERATURE.union(*_FACTORS.values()))
    raise ToolError(f"cannot convert {from_unit!r} to {to_unit!r}: both must be one of {', '.join(known)} "
                    "and measure the same thing")
