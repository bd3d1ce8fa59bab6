"""Offscreen RGB-D (and segmentation) rendering of one MuJoCo camera.

`mujoco.Renderer` renders colour and depth in two passes. Here one `mjr_render`
fills both buffers and one `mjr_readPixels` reads them, which halves the cost of
an RGB-D frame, the dominant cost of a simulation step.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402


_current_context = None  # the GL context last made current in this process


def _gl_context(width: int, height: int):
    """An offscreen GL context of the backend MUJOCO_GL names (egl by default, for headless machines).

    Chosen here rather than by `mujoco`'s import-time default, which depends on import order.
    """
    backend = os.environ.get("MUJOCO_GL", "egl").lower()
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    elif backend == "glfw":
        from mujoco.glfw import GLContext
    else:
        raise ValueError(f"MUJOCO_GL={backend!r} is not supported; use egl, osmesa or glfw")
    return GLContext(width, height)


class RGBDRenderer:
    """Renders `(rgb uint8 (H, W, 3), depth float32 (H, W) metres)` from a named camera.

    Depth is the z-distance along the optical axis (not the ray length), as in
    REP-118 depth images. Shadows, reflections, skybox and fog are switched off.
    """

    def __init__(
        self, model: mujoco.MjModel, camera: str, height: int, width: int, geom_groups: tuple[int, ...] = (0, 1, 2)
    ) -> None:
        if height < 8 or width < 8:
            raise ValueError(f"image size must be at least 8x8, got {height}x{width}")
        self.model = model
        self.height, self.width = int(height), int(width)
        self.camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if self.camera_id < 0:
            raise ValueError(f"camera {camera!r} not in model")
        # The offscreen framebuffer is allocated from these model fields.
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)

        global _current_context
        self._gl = _gl_context(self.width, self.height)
        self._gl.make_current()
        _current_context = self._gl
        self._con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._con)
        # Reversed-Z depth read back as 0 at the far plane: best precision far away.
        self._con.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(model, maxgeom=200)
        for flag in (
            mujoco.mjtRndFlag.mjRND_SHADOW,
            mujoco.mjtRndFlag.mjRND_REFLECTION,
            mujoco.mjtRndFlag.mjRND_SKYBOX,
            mujoco.mjtRndFlag.mjRND_FOG,
        ):
            self._scene.flags[flag] = False
        self._option = mujoco.MjvOption()
        # Only the geom groups this camera can see are drawn (each drawn geom costs render time).
        self._option.geomgroup[:] = [int(g in geom_groups) for g in range(6)]
        self._option.sitegroup[:] = 0
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = self.camera_id
        self._rect = mujoco.MjrRect(0, 0, self.width, self.height)
        self._rgb = np.empty((self.height, self.width, 3), np.uint8)
        self._zbuf = np.empty((self.height, self.width), np.float32)

    # -- camera model -------------------------------------------------------
    def intrinsics(self) -> np.ndarray:
        """Pinhole K (3, 3), OpenCV convention: pixel (u, v) indexes column, row; centres at integers."""
        fovy = np.deg2rad(self.model.cam_fovy[self.camera_id])
        f = 0.5 * self.height / np.tan(0.5 * fovy)
        return np.array(
            [[f, 0.0, (self.width - 1) / 2.0], [0.0, f, (self.height - 1) / 2.0], [0.0, 0.0, 1.0]],
            np.float32,
        )

    # -- rendering ----------------------------------------------------------
    def _update(self, data: mujoco.MjData) -> None:
        global _current_context
        if _current_context is not self._gl:  # switching contexts costs; most processes have one
            self._gl.make_current()
            _current_context = self._gl
        mujoco.mjv_updateScene(
            self.model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene
        )

    def render(self, data: mujoco.MjData) -> tuple[np.ndarray, np.ndarray]:
        """One pass: rgb uint8 (H, W, 3) and depth float32 (H, W) in metres."""
        self._update(data)
        mujoco.mjr_render(self._rect, self._scene, self._con)
        mujoco.mjr_readPixels(self._rgb, self._zbuf, self._rect, self._con)
        rgb = np.ascontiguousarray(self._rgb[::-1])
        return rgb, self._linear_depth(self._zbuf[::-1])

    def _linear_depth(self, zbuf: np.ndarray) -> np.ndarray:
        # MuJoCo 3.3+ renders with reversed Z, read back as 0 at the far plane (ZEROFAR):
        # z = near * far / (d * (far - near) + near) inverts its perspective depth mapping.
        extent = self.model.stat.extent  # read each time: mj_setConst may change it
        near, far = np.float32(self.model.vis.map.znear * extent), np.float32(self.model.vis.map.zfar * extent)
        return (near * far) / (zbuf * np.float32(far - near) + np.float32(near))

    def render_segmentation(self, data: mujoco.MjData) -> np.ndarray:
        """Geom id per pixel, int32 (H, W); -1 where nothing is drawn."""
        self._update(data)
        flags = self._scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = True
        flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = True
        try:
            mujoco.mjr_render(self._rect, self._scene, self._con)
            mujoco.mjr_readPixels(self._rgb, None, self._rect, self._con)
        finally:
            flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = False
            flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = False
        img = self._rgb[::-1].astype(np.int32)
        segid = img[..., 0] + (img[..., 1] << 8) + (img[..., 2] << 16)
        # segid is 1 + index into scene.geoms; map it to the model geom id.
        lut = np.full(self._scene.ngeom + 1, -1, np.int32)
        for i in range(self._scene.ngeom):
            g = self._scene.geoms[i]
            if g.objtype == mujoco.mjtObj.mjOBJ_GEOM and g.segid >= 0:
                lut[g.segid + 1] = g.objid
        segid = np.clip(segid, 0, self._scene.ngeom)
        return lut[segid]

    def close(self) -> None:
        if getattr(self, "_con", None) is not None:
            global _current_context
            self._gl.make_current()
            self._con.free()
            _current_context = None
            self._con = None
            self._gl.free()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
