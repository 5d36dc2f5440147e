-- The recording media started when the Space went live (OpenSpaceResponse.recording),
-- `spaces/{space}/recordings/{recording}`; empty when the Space is not recorded. Carried by
-- the recording_state_changed live events.
ALTER TABLE spaces ADD COLUMN recording_name text NOT NULL DEFAULT '';
